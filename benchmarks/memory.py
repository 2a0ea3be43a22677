"""Activation memory of one training step per ``trainer.recompute`` mode and ``trainer.loss_chunk``, and
the longest context that fits a memory budget.

    python -m benchmarks.memory                        # CPU: scaled hybrid, S 2K-16K (+ 32K/64K linear-only)
    python -m benchmarks.memory --seqs 8192,16384 --skip-long --budget-mb 192
    python -m benchmarks.memory --gpu --model 1b --seqs 16384,32768 --budget-mb 60000   # on a GPU

Every measurement runs in a fresh process (``--probe``), so peaks are clean: the model is built
(fp32, seed 0), one small warm-up step allocates the gradients and imports what checkpointing needs,
then one forward + backward of ``S`` tokens (batch 1; under ``--cp 2`` two gloo processes each holding
S/2 tokens) is measured: peak RSS (VmHWM, reset through ``/proc/self/clear_refs``; allocations of
64 KiB and more go straight to mmap so freed memory leaves the RSS) or the CUDA allocator's peak,
minus the memory before the step (parameters and gradients). That *step memory* divided by S x layers
is printed beside the closed form of :func:`estimate` (values per token, fp32):

* kept per layer, ``none``: linear ``16d + 4f`` (norms 3d, q/k before and after silu 4d, v, output,
  its norm, gate, gated output 6d, pre-MLP norm 3d, SwiGLU 4f); softmax ``10d + 3d_kv + 4f``;
  ``selective``: linear ``12d``, softmax ``6d + 3d_kv`` (norms and MLP dropped); ``full``: ``d``.
* plus, once per step, the peak of the backward: the head (3d + the embedding output d) and the larger
  of the logits term (``3V``: logits, log-softmax, its gradient; ``3V·N/S`` with ``loss_chunk=N``) and what the
  mode rebuilds (selective: one MLP ``4f + 3d``; full: one block at ``none`` plus ~2 gradients).

Step time overhead is the step's wall time against ``none`` at the same S (one CPU thread per process
on CPU: relative numbers only). Max context: per mode (with ``loss_chunk``), the longest S (1 K steps)
whose step memory fits ``--budget-mb``, found from the estimate's guess by probing up/down.
Results: ``benchmarks/results/memory_cpu.md`` and ``memory_cpu.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# the default hybrid's shapes (configs/model/1b.yaml: d 2048, ffn 5632 = 2.75 d, GQA 4:1, V/d ~ 16,
# 3 linear : 1 softmax) scaled down 16x in width so a CPU runs 64K tokens in minutes
SCALED = dict(vocab_size=2048, d_model=128, n_layers=4, pattern="LLLF", n_heads=4, n_kv_heads=1,
              ffn_hidden=352, max_seq_len=1 << 17)
ONE_B = dict(vocab_size=32000, d_model=2048, n_layers=16, pattern="LLLF", n_heads=16, n_kv_heads=4,
             ffn_hidden=5632, max_seq_len=1 << 20)
MODES = ("none", "selective", "full")
CHUNK = 1024


# ---------------------------------------------------------------------------- closed form

def estimate(model: dict, mode: str, chunk: int, seq: int) -> float:
    """Step memory per token per layer (bytes, fp32) of :func:`_probe`'s step of ``seq`` tokens per
    rank, from the counts in the module docstring."""
    from dist_attn.model.config import ModelConfig
    m = ModelConfig(**model)
    d, f, v = m.d_model, m.ffn_dim, m.vocab_size
    dkv = m.kv_heads * m.softmax_head_dim
    kept = {"none": {"L": 16 * d + 4 * f, "F": 10 * d + 3 * dkv + 4 * f},
            "selective": {"L": 12 * d, "F": 6 * d + 3 * dkv},
            "full": {"L": d, "F": d}}[mode]
    per_layer = sum(kept.get(t, kept["L"]) for t in m.layer_types)
    block_none = max(16 * d + 4 * f, 10 * d + 3 * dkv + 4 * f)
    rebuild = {"none": 0, "selective": 4 * f + 3 * d, "full": block_none + 2 * d}[mode]
    logits = 3 * v * (min(chunk, seq) / seq if chunk else 1)  # one chunk's logits at a time
    total = per_layer + 4 * d + max(logits, rebuild)
    return 4.0 * total / m.n_layers


# ---------------------------------------------------------------------------- one measurement

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _probe(rank: int, world: int, spec: dict) -> dict:
    """One fresh process (or CP rank): warm-up, then one measured step of spec['seq'] global tokens."""
    import torch.distributed as dist
    from dist_attn.context import CPContext
    from dist_attn.data.sharding import shard_batch
    from dist_attn.model.config import ModelConfig
    from dist_attn.model.hybrid import HybridLM
    from dist_attn.train.telemetry import peak_memory_mb, reset_peak_memory
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device("cuda", torch.cuda.current_device()) if spec.get("gpu") else torch.device("cpu")
    cp = CPContext(group=dist.group.WORLD, layout="zigzag") if world > 1 else CPContext()
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**spec["model"]), cp).to(device).set_memory(spec["mode"])
    chunk = spec["chunk"]

    def step(s: int) -> None:
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, spec["model"]["vocab_size"], (1, s), generator=g)
        ids, labels, pos = shard_batch(ids, ids.roll(-1, 1), rank, world, "zigzag")
        ids, labels, pos = ids.to(device), labels.to(device), pos.to(device)
        if chunk:
            loss = model.loss_chunked(model(ids, pos, return_hidden=True), labels, chunk)[0]
        else:
            loss = HybridLM.loss_sum(model(ids, pos), labels)[0]
        loss.backward()

    step(512 * world)  # gradients allocated, checkpointing's imports done
    model.zero_grad(set_to_none=False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _rss_mb()
    reset_peak_memory(device)
    times = []
    for _ in range(spec.get("repeats", 2)):  # the step's time: the faster of two (shared machines are noisy)
        t0 = time.perf_counter()
        step(spec["seq"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)
    return dict(step_mb=peak_memory_mb(device) - base, base_mb=base, time_s=min(times))


def _probe_main(spec: dict) -> dict:
    world = spec.get("cp", 1)
    if world == 1:
        return _probe(0, 1, spec)
    from tests.dist import run_distributed
    out = run_distributed(_probe, world, spec, timeout=None)
    return dict(step_mb=max(o["step_mb"] for o in out), base_mb=max(o["base_mb"] for o in out),
                time_s=max(o["time_s"] for o in out))


def measure(spec: dict) -> dict:
    """Run one probe in a fresh interpreter (clean peaks); large allocations go to mmap (freed -> unmapped)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(spec.get("threads", 1)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--probe", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    if proc.returncode != 0:  # out of memory or a bug: report it, do not stop the sweep
        return dict(step_mb=float("inf"), base_mb=0.0, time_s=float("nan"), error=proc.stderr[-400:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the sweep and the search

def sweep(model: dict, seqs: list, modes, chunks, gpu: bool, log) -> list:
    rows = []
    for s in seqs:
        for chunk in chunks:
            for mode in modes:
                r = measure(dict(model=model, mode=mode, chunk=chunk, seq=s, gpu=gpu))
                per = r["step_mb"] * 2**20 / (s * model["n_layers"])
                rows.append(dict(seq=s, mode=mode, chunk=chunk, step_mb=r["step_mb"], per_token_layer=per,
                                 estimate=estimate(model, mode, chunk, s), time_s=r["time_s"],
                                 pattern=model["pattern"]))
                log(f"S={s:6d} {mode:9s} chunk={chunk:5d}: step {r['step_mb']:8.1f} MB, {per:8.0f} B/token/layer "
                    f"(estimate {rows[-1]['estimate']:8.0f}), {r['time_s']:.2f} s {r.get('error', '')}")
    return rows


def max_context(model: dict, mode: str, chunk: int, budget_mb: float, cp: int, gpu: bool, log,
                step: int = 1024, limit: int = 1 << 17) -> tuple[int, int]:
    """Longest S (multiple of ``step``) whose step memory fits ``budget_mb`` on every rank; (S, probes)."""
    per_token = estimate(model, mode, chunk, 8192) * model["n_layers"] / 2**20  # MB per local token
    guess = max(step, min(limit, int(budget_mb / per_token * cp) // step * step))
    fits = {}

    def ok(s):
        if s not in fits:
            r = measure(dict(model=model, mode=mode, chunk=chunk, seq=s, gpu=gpu, cp=cp, repeats=1))
            fits[s] = r["step_mb"] <= budget_mb
            log(f"  max-context {mode} chunk={chunk} cp={cp}: S={s} -> {r['step_mb']:.1f} MB "
                f"{'fits' if fits[s] else 'over'}")
        return fits[s]

    s = guess
    if ok(s):
        while s + step <= limit and ok(s + step):
            s += step
        return s, len(fits)
    while s > step and not ok(s - step):
        s -= step
    return (s - step if s > step else 0), len(fits)


def _plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = dict(zip(MODES, ("C0", "C1", "C2")))
    for pattern, marker in (("LLLF", "o"), ("LLLL", "x")):
        for mode in MODES:
            for chunk, line in ((0, "-"), (CHUNK, "--")):
                pts = sorted((r["seq"], r["step_mb"]) for r in rows if r["mode"] == mode and r["chunk"] == chunk
                             and r["pattern"] == pattern)
                if pts:
                    ax.plot(*zip(*pts), marker + line, color=colors[mode],
                            label=f"{mode}{' + loss_chunk' if chunk else ''} ({pattern})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("step memory above parameters (MB)")
    ax.set_title("peak memory of one training step (scaled hybrid; LLLL: linear-only, to 64K)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=("scaled", "1b"), default="scaled")
    p.add_argument("--seqs", default="2048,4096,8192,16384")
    p.add_argument("--long-seqs", default="32768,65536", help="linear-only (LLLL) model: O(S) time on CPU")
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--budget-mb", type=float, default=192.0, help="step memory budget of the max-context search")
    p.add_argument("--skip-max", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--depth", action="store_true",
                   help="only the 1b-depth check: the scaled model with 16 layers at --depth-seq, merged into --out")
    p.add_argument("--depth-seq", type=int, default=16384)
    p.add_argument("--out", default=os.path.join(RESULTS, "memory_cpu.md"))
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(_probe_main(json.loads(a.probe))))
        return
    from benchmarks.common import device_name
    model = dict(SCALED if a.model == "scaled" else ONE_B)
    js = os.path.splitext(a.out)[0] + ".json"

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    if a.depth:  # the default hybrid's depth (16 layers, 1b.yaml): per-layer shares as in the 1b model
        deep = dict(model, n_layers=16)
        rows = []
        for mode, chunk in (("none", 0), ("selective", 0), ("full", 0), ("full", CHUNK)):
            r = measure(dict(model=deep, mode=mode, chunk=chunk, seq=a.depth_seq, gpu=a.gpu, repeats=1))
            rows.append(dict(seq=a.depth_seq, mode=mode, chunk=chunk, step_mb=r["step_mb"], time_s=r["time_s"],
                             per_token_layer=r["step_mb"] * 2**20 / (a.depth_seq * 16),
                             estimate=estimate(deep, mode, chunk, a.depth_seq), pattern="LLLF"))
            log(f"depth 16: {rows[-1]}")
        data = json.load(open(js)) if os.path.exists(js) else dict(model=model, rows=[], long_rows=[], maxes=[])
        data.update(depth_rows=rows, depth_model=deep)
        with open(js, "w") as f:
            json.dump(data, f, indent=1)
        _write(a, data["model"], data["rows"], data["long_rows"], data["maxes"], device_name(),
               data.get("elapsed", 0.0) + time.time() - t0, depth=(deep, rows))
        if data["rows"]:
            _plot(data["rows"] + data["long_rows"], os.path.splitext(a.out)[0] + ".png")
        return
    rows = sweep(model, [int(s) for s in a.seqs.split(",")], MODES, (0, CHUNK), a.gpu, log)
    long_rows = []
    if not a.skip_long:
        lin = dict(model, pattern="LLLL")
        long_rows = sweep(lin, [int(s) for s in a.long_seqs.split(",")], MODES, (CHUNK,), a.gpu, log)
    maxes = []
    if not a.skip_max:
        for cp in (1, 2):
            for mode, chunk in [("none", 0)] + [(m, CHUNK) for m in MODES]:
                s, n = max_context(model, mode, chunk, a.budget_mb, cp, a.gpu, log)
                maxes.append(dict(cp=cp, mode=mode, chunk=chunk, seq=s, probes=n))
    with open(js, "w") as f:
        json.dump(dict(model=model, rows=rows, long_rows=long_rows, maxes=maxes, elapsed=time.time() - t0), f,
                  indent=1)
    _write(a, model, rows, long_rows, maxes, device_name(), time.time() - t0)
    _plot(rows + long_rows, os.path.splitext(a.out)[0] + ".png")


def _write(a, model, rows, long_rows, maxes, device, elapsed, depth=None) -> None:
    out = [f"# Activation memory per recompute mode and loss_chunk ({device})", "",
           f"`python -m benchmarks.memory{' && python -m benchmarks.memory --depth' if depth else ''}` — "
           f"{elapsed / 60:.1f} min. Model: "
           f"`{json.dumps(model)}` (fp32, batch 1, one process per measurement, one thread). "
           "Step memory = peak of one forward + backward above the memory before it (parameters and "
           "gradients); per token per layer = step memory / (S x layers); estimate: the closed form of "
           "`benchmarks.memory.estimate`. Overhead: step time / `none`'s at the same S and chunk.", ""]
    for title, rs in (("Hybrid LLLF", rows), ("Linear-only LLLL (long sequences; O(S) time on CPU)", long_rows)):
        if not rs:
            continue
        out += [f"## {title}", "", "| S | mode | loss_chunk | step MB | B/token/layer | estimate | step s | overhead |",
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
        base = {(r["seq"], r["chunk"]): r["time_s"] for r in rs if r["mode"] == "none"}
        if not any(r["chunk"] == 0 for r in rs):  # long rows: chunked only
            out += [f"| {r['seq']} | {r['mode']} | {r['chunk']} | {r['step_mb']:.1f} | {r['per_token_layer']:.0f} "
                    f"| {r['estimate']:.0f} | {r['time_s']:.2f} | {r['time_s'] / base[(r['seq'], r['chunk'])]:.2f}x |"
                    for r in rs]
            out.append("")
            continue
        for r in rs:
            ov = r["time_s"] / base[(r["seq"], r["chunk"])]
            out.append(f"| {r['seq']} | {r['mode']} | {r['chunk']} | {r['step_mb']:.1f} | {r['per_token_layer']:.0f} "
                       f"| {r['estimate']:.0f} | {r['time_s']:.2f} | {ov:.2f}x |")
        out.append("")
        at = max(r["seq"] for r in rs if r["seq"] <= 16384)
        by = {(r["mode"], r["chunk"]): r["step_mb"] for r in rs if r["seq"] == at}
        out += [f"At S={at}: none / full = {by[('none', 0)] / by[('full', 0)]:.2f}x (no chunk), "
                f"{by[('none', CHUNK)] / by[('full', CHUNK)]:.2f}x (loss_chunk={CHUNK}); none / selective = "
                f"{by[('none', 0)] / by[('selective', 0)]:.2f}x; loss_chunk saves "
                f"{by[('none', 0)] - by[('none', CHUNK)]:.0f} MB under none (logits term 3V x 4 B x S = "
                f"{3 * model['vocab_size'] * 4 * at / 2**20:.0f} MB).", ""]
    if depth:
        deep, rs = depth
        by = {(r["mode"], r["chunk"]): r for r in rs}
        n, f = by[("none", 0)]["step_mb"], by[("full", 0)]["step_mb"]
        out += [f"## The default hybrid's depth: 16 layers (configs/model/1b.yaml), scaled width, S={rs[0]['seq']}",
                "", "Same widths, 16 layers: the per-layer shares of the 1b model (every term scales with d; "
                f"closed form for the real 1b at S=16K: none / full = "
                f"{estimate(ONE_B, 'none', 0, 16384) / estimate(ONE_B, 'full', 0, 16384):.2f}x).", "",
                "| mode | loss_chunk | step MB | B/token/layer | estimate | step s |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['mode']} | {r['chunk']} | {r['step_mb']:.1f} | {r['per_token_layer']:.0f} | {r['estimate']:.0f} "
                f"| {r['time_s']:.1f} |" for r in rs]
        out += ["", f"none / full = **{n / f:.2f}x** (target >= 3x); none / selective = "
                f"{n / by[('selective', 0)]['step_mb']:.2f}x; none / (full + loss_chunk) = "
                f"{n / by[('full', CHUNK)]['step_mb']:.2f}x.", ""]
    if maxes:
        out += [f"## Max context within a step-memory budget of {a.budget_mb:.0f} MB per rank", "",
                "| CP | mode | loss_chunk | longest S | probes |", "|---:|---|---:|---:|---:|"]
        out += [f"| {m['cp']} | {m['mode']} | {m['chunk']} | {m['seq']} | {m['probes']} |" for m in maxes]
        out.append("")
    out.append(f"![peak memory vs S]({os.path.basename(os.path.splitext(a.out)[0])}.png)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
