"""Training-step throughput and MFU of the full system (model + CP strategies + DeepSpeed engine).

    python -m benchmarks.train                       # CPU, 1 process: tiny hybrid, CP=1
    python -m benchmarks.train --nproc 2             # CPU, 2 gloo processes: CP=2 (ring/LASP-2, Ulysses), DP=2
    torchrun --nproc_per_node 1 -m benchmarks.train --preset gpu          # ~1B hybrid at 8K tokens, bf16
    torchrun --nproc_per_node 8 -m benchmarks.train --preset gpu parallel.cp=8   # extra Hydra overrides

Each configuration trains ``--warmup + --steps`` optimizer steps on MQAR batches through
:class:`dist_attn.train.trainer.Trainer` (no checkpoints) and reports the median over the measured
steps of the step time, global tokens/s and MFU. FLOPs per token follow
``ModelConfig.flops_per_token``: 6 x matmul parameters + attention (softmax causal-halved, linear
chunked C=64), backward = 2 x forward, no recompute. MFU divides by the peak of every device; on
CPU that peak is a per-thread guess (0.1 TFLOP/s), so CPU MFU is an estimate for comparing runs
only. Results: ``benchmarks/results/train_<preset>_np<N>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from benchmarks.common import device_name, launch, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["trainer.ckpt_every=0", "trainer.log_every=1", "trainer.tensorboard=false", "trainer.progress=false"]
# name -> overrides, per world size; the global batch is the same within a preset
PRESETS = {
    "cpu": {
        "base": ["model=tiny", "data.seq_len=1024", "data.vocab_size=64", "data.num_kv_pairs=16",
                 "trainer.micro_batch=2"],
        1: {"cp1": [], "cp1_megatron": ["backend=megatron"]},
        2: {"cp2_ring_lasp2": ["parallel.cp=2"],
            "cp2_ulysses": ["parallel.cp=2", "parallel.softmax_cp=ulysses", "parallel.linear_cp=ulysses"],
            "dp2": ["parallel.cp=1", "trainer.micro_batch=1"],
            "cp2_megatron": ["backend=megatron", "parallel.cp=2"]},
    },
    "gpu": {
        "base": ["model=1b", "data.seq_len=8192", "data.vocab_size=64",
                 "data.num_kv_pairs=64", "trainer.micro_batch=1"],
        "any": {"cp_all": ["backend=zero1_bf16", "parallel.cp=${world}"],
                "cp_all_megatron": ["backend=megatron", "backend.precision=bf16", "parallel.cp=${world}"]},
    },
}


def _runs(preset: str, world: int) -> dict:
    p = PRESETS[preset]
    if "any" in p:
        return {name: [o.replace("${world}", str(world)) for o in ov] for name, ov in p["any"].items()}
    if world not in p:
        raise ValueError(f"benchmarks.train: preset {preset!r} expects a world size in "
                         f"{[k for k in p if isinstance(k, int)]}, got {world}. Fix: pass --nproc accordingly.")
    return p[world]


def _bench(rank, world, device, preset, extra, steps, warmup, out_dir):
    from hydra import compose, initialize_config_dir
    from dist_attn.train.config import register_configs, to_train_config
    from dist_attn.train.trainer import Trainer
    register_configs()
    rows = []
    for name, overrides in _runs(preset, world).items():
        ov = PRESETS[preset]["base"] + overrides + COMMON + [f"trainer.steps={warmup + steps}",
                                                             f"trainer.warmup_steps={warmup}"] + extra
        with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
            cfg = to_train_config(compose("train", overrides=ov))
        run_dir = os.path.join(out_dir, name)
        trainer = Trainer(cfg, run_dir)
        trainer.run()
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                measured = [json.loads(line) for line in f][warmup:]
            med = {k: statistics.median(r[k] for r in measured) for k in ("step_time_s", "tokens_per_s", "mfu")}
            p = cfg.parallel
            rows.append(dict(run=name, backend=cfg.backend.name, params_M=round(cfg.model.num_params() / 1e6, 2), seq_len=cfg.data.seq_len,
                             tokens_per_step=trainer.tokens_per_step, cp=p.cp, dp=trainer.dims.dp, pp=p.pp,
                             softmax_cp=p.softmax_cp, linear_cp=p.linear_cp, precision=cfg.backend.precision,
                             zero=cfg.backend.zero_stage, step_time_s=med["step_time_s"],
                             tokens_per_s=med["tokens_per_s"], mfu=med["mfu"],
                             comm_sent_MB_rank0=measured[-1]["comm_sent_bytes"] / 2**20,
                             mem_peak_gb=measured[-1]["mem_peak_gb"],
                             peak_tflops_per_device=trainer.telemetry.peak / 1e12,
                             mfu_is_estimate=measured[-1]["mfu_is_estimate"],
                             flops_per_token=trainer.flops_per_token))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default without CUDA) | gpu")
    ap.add_argument("--nproc", type=int, default=1, help="gloo CPU processes when not under torchrun")
    ap.add_argument("--steps", type=int, default=5, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. parallel.softmax_cp=ulysses")
    args = ap.parse_args()
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    with tempfile.TemporaryDirectory() as tmp:
        rows = launch(_bench, args.nproc, preset, args.overrides, args.steps, args.warmup, tmp)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank returns; rank 0 writes
        return
    meta = dict(device=device_name(), world_size=world, torch=torch.__version__,
                measured=f"median of {args.steps} steps after {args.warmup} warm-up steps",
                flops="ModelConfig.flops_per_token: 6*N_matmul + attention (causal halving), bwd = 2x fwd",
                mfu_note="CPU peak is a guess (0.1 TFLOP/s per thread): compare runs, not hardware"
                if not torch.cuda.is_available() else "peak: dense bf16 datasheet value per GPU",
                overrides=" ".join(args.overrides) or "none")
    cols = ["run", "backend", "params_M", "seq_len", "tokens_per_step", "cp", "dp", "softmax_cp", "linear_cp", "precision",
            "zero", "step_time_s", "tokens_per_s", "mfu", "comm_sent_MB_rank0", "mem_peak_gb"]
    paths = write_results(f"train_{preset}_np{world}", rows, cols, meta, args.out)
    for r in rows:
        print(f"{r['run']:>16}: {r['tokens_per_s']:9.0f} tokens/s  step {r['step_time_s']:.3f} s  MFU {r['mfu']:.2%}"
              f"{' (estimate)' if r['mfu_is_estimate'] else ''}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
