"""Ahead-of-time compile of every Triton kernel for Hopper (sm_90a) on a machine without a GPU.

    python -m benchmarks.kernels_aot                 # the full table -> benchmarks/results/kernels_aot_sm90a.{json,md}
    python -m benchmarks.kernels_aot --only lightning

The real host wrappers run on ``meta`` tensors (shapes and dtypes, no data) at the configurations of
issue 14; every Triton launch is intercepted (``JITFunction.run``) and turned into exactly the
compile a real launch would do: Triton's own argument binder gives the specialisation (types, 16-byte
alignment of pointers, divisibility of integers, constexprs) and the launch options (warps, stages),
then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. The PTX then goes through
Triton's bundled ``ptxas -arch=sm_90a -v``, which reports registers per thread and spill bytes;
shared memory is Triton's own figure (dynamic shared memory of the launch); ``wgmma`` is
``wgmma.mma_async`` in the PTX (Hopper tensor cores; otherwise mma.sync, Ampere-class).

Configurations: flash attention B=2, S=8192, H=16, D 64 and 128, MHA and GQA 4:1, bf16, causal
(forward, and backward with a gradient into the LSE), and a ring shard B=1, S=1024 (D128 GQA 4:1,
D64 MHA) whose grids are below two waves of 132 SMs (the small-grid tiles and the dK/dV GQA split,
``--only small``); lightning B=1, H=8, S=8192, D=128, bf16 with
decay, initial state and a final-state gradient, and with per-token gates and documents. Needs a
Triton with the NVIDIA backend whose JITFunction has ``_pack_args`` (3.4 to 3.7; checked with 3.7.1),
no GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

META = torch.device("meta")


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    kernel: str
    config: str
    num_warps: int
    num_stages: int
    regs: int
    spill_stores: int
    spill_loads: int
    smem: int
    wgmma: bool
    grid: str
    variant: str = ""


class capture_launches:
    """Context manager: Triton launches inside it are recorded (not run). ``.launches`` after exit."""

    def __enter__(self):
        self.launches, self._orig = [], JITFunction.run
        launches = self.launches

        def record(fn, *args, grid, warmup=False, **kwargs):
            launches.append(Launch(fn, args, dict(kwargs, _grid=grid)))
            return None
        JITFunction.run = record
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def compile_launch(launch: Launch):
    """Compile one recorded launch for sm_90a exactly as the launch would; returns the compiled kernel."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn, kwargs = launch.fn, dict(launch.kwargs)
    kwargs.pop("_grid")
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError(f"kernels_aot: expected a Triton whose JITFunction has _pack_args (3.4-3.7), got "
                           f"Triton {triton.__version__}. Fix: run it with the CPU pin (constraints-cpu.txt).")
    backend = make_backend(_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(), options=options.__dict__)


def ptxas_report(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -arch=sm_90a -v``."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, stores, loads


def report(launch: Launch, config: str) -> Compiled:
    k = compile_launch(launch)
    ptx = k.asm["ptx"]
    regs, st, ld = ptxas_report(ptx)
    md = k.metadata
    grid = launch.kwargs["_grid"]
    return Compiled(kernel=launch.fn.fn.__name__, config=config, num_warps=md.num_warps, num_stages=md.num_stages,
                    regs=regs, spill_stores=st, spill_loads=ld, smem=md.shared, wgmma="wgmma.mma_async" in ptx,
                    grid="x".join(str(g) for g in (grid if isinstance(grid, tuple) else ())),
                    variant=",".join(k for k, v in launch.kwargs.items() if v is True))


# --- the wrappers at the configurations of issue 14 --------------------------------------------------
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def flash_launches(d: int, hkv: int, b=2, s=8192, hq=16, causal=True) -> list[Launch]:
    from dist_attn.kernels.flash_attn import triton_kernel as fk
    q, k, v = _meta(b, s, hq, d), _meta(b, s, hkv, d), _meta(b, s, hkv, d)
    with capture_launches() as cap:
        out, lse = fk.fwd(q, k, v, causal=causal)
        fk.bwd(_meta(b, s, hq, d), q, k, v, out, lse, causal=causal, dlse=_meta(b, hq, s, dtype=torch.float32))
    return cap.launches


def lightning_launches(b=1, h=8, s=8192, d=128, gated=False) -> list[Launch]:
    from dist_attn.kernels.lightning_attn import triton_kernel as lk
    q, k, v = _meta(b, s, h, d), _meta(b, s, h, d), _meta(b, s, h, d)
    kw = dict(decay=torch.full((h,), -0.1, device=META), initial_state=_meta(b, h, d, d, dtype=torch.float32))
    if gated:
        kw.update(g=_meta(b, s, h, dtype=torch.float32), cu_seqlens=torch.tensor([0, 1000, s], dtype=torch.int32))
    with capture_launches() as cap:
        lk.lightning_fwd(q, k, v, **kw)
        lk.lightning_bwd(_meta(b, s, h, d), _meta(b, h, d, d, dtype=torch.float32), q, k, v, **kw)
    return cap.launches


def configs(only: str | None = None) -> list[tuple[str, list[Launch]]]:
    out = []
    if only in (None, "flash"):
        for d in (128, 64):
            for hkv, tag in ((16, "MHA"), (4, "GQA4")):
                out.append((f"flash B2 S8192 H16 D{d} {tag} bf16 causal", flash_launches(d, hkv)))
    if only in (None, "flash", "small"):
        # a ring shard (B=1, 1K tokens per rank): every flash grid is below two waves of 132 SMs, so
        # the small-grid tiles (64-row / 64-key resident tiles, 4 warps) and the dK/dV GQA split apply
        for d, hkv, tag in ((128, 4, "GQA4"), (64, 16, "MHA")):
            out.append((f"flash B1 S1024 H16 D{d} {tag} bf16 causal small-grid", flash_launches(d, hkv, b=1, s=1024)))
    if only in (None, "lightning"):
        out.append(("lightning B1 H8 S8192 D128 bf16", lightning_launches()))
    return out


def _dedup(launches: list[Launch]) -> list[Launch]:
    """One launch per (kernel, constexprs, options): the scan runs twice with the same specialisation."""
    seen, keep = set(), []
    for la in launches:
        key = (la.fn.fn.__name__, tuple(sorted((k, str(v)) for k, v in la.kwargs.items() if k != "_grid")))
        if key not in seen:
            seen.add(key)
            keep.append(la)
    return keep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["flash", "small", "lightning"], default=None)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    from benchmarks.common import write_results
    rows = []
    for config, launches in configs(args.only):
        for la in _dedup(launches):
            r = report(la, config)
            rows.append(r.__dict__)
            print(f"{r.kernel:>16} {r.variant:<22} {config:<36} warps {r.num_warps} stages {r.num_stages} regs {r.regs:>3} "
                  f"spill {r.spill_stores:>4}/{r.spill_loads:<4} smem {r.smem:>6} wgmma {r.wgmma}", flush=True)
    meta = dict(target="sm_90a (GPUTarget('cuda', 90, 32)), Triton's bundled ptxas -v", triton=triton.__version__,
                torch=torch.__version__, spill="bytes spill stores / loads per thread (ptxas)",
                smem="dynamic shared memory per program, bytes (Triton)")
    name = "kernels_aot_sm90a" if args.only is None else f"kernels_aot_sm90a_{args.only}"
    paths = write_results(name, rows, ["kernel", "variant", "config", "num_warps", "num_stages", "regs", "spill_stores",
                                       "spill_loads", "smem", "wgmma", "grid"], meta, args.out_dir)
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
