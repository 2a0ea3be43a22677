"""The prepared GPU check (``benchmarks/gpu_check.sh``): its CPU dry run, and the CUDA correctness
stage it runs on a GPU machine.

Without a GPU only the dry-run tests run (the script must detect the missing GPU, say so, install
nothing and exit 0, or 2 when ``GPU_CHECK_REQUIRE_GPU=1``). On a GPU (stage a of the script) the
CUDA tests compare, on CUDA tensors, against fp64 references computed on the CPU:

* flash attention (Triton) forward/backward: causal and full, offsets (ring blocks), GQA, D 64/96/128,
  bf16/fp16/fp32, a gradient into the LSE;
* lightning attention (Triton) with decay and state in/out: out, final state and every gradient;
* every CP strategy at P = 1 (an NCCL group of one process) through the dispatch kernels;
* torch's flash ops behind ``sdpa_kernel`` (no fallback): full, diagonal, bottom-right causal blocks,
  packed documents and windows as varlen segments, trailing keys, rows without keys; and ``auto``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import assert_close

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CUDA = torch.cuda.is_available()
# GPU_CHECK_ON_CPU=1 runs the CUDA tests on CPU tensors (Triton interpreter, gloo): slow, a check of the tests
ON_CPU = not CUDA and os.environ.get("GPU_CHECK_ON_CPU") == "1"
needs_cuda = pytest.mark.skipif(not (CUDA or ON_CPU), reason="CUDA tests of benchmarks/gpu_check.sh stage a")


# --- the CPU dry run ---------------------------------------------------------------------------------
def _run_script(*args, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.update(env_extra)  # no GPU even on a GPU box
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_wheels.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_check_dry_run_without_gpu_says_so_and_runs_nothing():
    summary = ROOT / "benchmarks" / "results" / "gpu_check_summary.md"
    before = summary.stat().st_mtime if summary.exists() else None
    res = _run_script()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SKIPPED: no CUDA GPU" in res.stdout, res.stdout
    after = summary.stat().st_mtime if summary.exists() else None
    assert after == before, "the dry run must not write results"
    # an interpreter that cannot even report (here `false`) is "no GPU" too; REQUIRE makes it exit 2
    res = _run_script("--dry-run", GPU_CHECK_REQUIRE_GPU="1", PYTHON=shutil.which("false") or "false")
    assert res.returncode == 2 and "SKIPPED: no CUDA GPU" in res.stdout, res.stdout + res.stderr


# --- stage a: CUDA correctness (skipped on CPU) ------------------------------------------------------
DEV = torch.device("cuda") if CUDA else torch.device("cpu")
FLASH_CASES = [  # (id, Sq, Sk, Hq, Hkv, D, causal, q_offset, k_offset)
    ("causal-diag-gqa-d128", 517, 517, 8, 2, 128, True, 0, 0),
    ("causal-ringblock-d64", 300, 257, 4, 4, 64, True, 256, 0),
    ("causal-partial-mqa-d96", 200, 333, 4, 1, 96, True, 100, 150),
    ("full-d128", 129, 700, 4, 2, 128, False, 0, 0),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: c[0])
def test_cuda_flash_triton_vs_fp64(case, dtype):
    from dist_attn.kernels.flash_attn import flash_attn
    from dist_attn.kernels.flash_attn.naive import attention_ref
    _, sq, sk, hq, hkv, d, causal, qo, ko = case
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, sq, hq, d, generator=gen).to(dtype)
    k, v = (torch.randn(2, sk, hkv, d, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(2, sq, hq, d, generator=gen).to(dtype)
    dlse = torch.randn(2, hq, sq, generator=gen)
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref_in, causal=causal, q_offset=qo, k_offset=ko)
    torch.autograd.backward((o_ref, l_ref), (dout.double(), torch.where(torch.isinf(l_ref), 0, dlse.double())))
    gpu_in = [t.to(DEV, copy=True).requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attn(*gpu_in, causal=causal, q_offset=qo, k_offset=ko, return_lse=True, backend="triton")
    torch.autograd.backward((out, lse), (dout.to(DEV), dlse.to(DEV)))
    assert_close("out", o_ref, out, dtype)
    assert_close("lse", l_ref, lse, torch.float32 if dtype == torch.float32 else dtype)
    for name, r, g in zip(("dq", "dk", "dv"), ref_in, gpu_in):
        assert_close(name, r.grad, g.grad, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_lightning_triton_vs_fp64(dtype):
    from dist_attn.kernels.lightning_attn import lightning_attn
    from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
    b, s, h, dk, dv = 2, 333, 4, 64, 128
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(b, s, h, dk, generator=gen).to(dtype) for _ in range(2))
    v, dout = (torch.randn(b, s, h, dv, generator=gen).to(dtype) for _ in range(2))
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    dfin = torch.randn(b, h, dk, dv, generator=gen)
    decay = torch.tensor([-1.0, -0.1, -0.01, 0.0])
    ref_in = [t.double().requires_grad_(True) for t in (q, k, v, s0)]
    o_ref, f_ref = linear_attn_recurrent(*ref_in[:3], decay=decay.double(), initial_state=ref_in[3])
    torch.autograd.backward((o_ref, f_ref), (dout.double(), dfin.double()))
    gpu_in = [t.to(DEV, copy=True).requires_grad_(True) for t in (q, k, v, s0)]
    out, fin = lightning_attn(*gpu_in[:3], decay=decay.to(DEV), initial_state=gpu_in[3], output_final_state=True,
                              backend="triton")
    torch.autograd.backward((out, fin), (dout.to(DEV), dfin.to(DEV)))
    assert_close("out", o_ref, out, dtype)
    assert_close("final_state", f_ref, fin, dtype)
    for name, r, g in zip(("dq", "dk", "dv", "dinitial_state"), ref_in, gpu_in):
        assert_close(name, r.grad, g.grad, dtype)


@needs_cuda
def test_cuda_strategies_at_p1_vs_fp64():
    """Every CP strategy on an NCCL group of one (the CUDA code paths of the collectives and kernels)."""
    import torch.distributed as dist
    from dist_attn.allgather import allgather_attention
    from dist_attn.kernels.flash_attn.naive import attention_ref
    from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
    from dist_attn.lasp2 import lasp2_attention
    from dist_attn.ring import ring_attention
    from dist_attn.ulysses import ulysses_attention
    from dist_attn.usp import usp_attention
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if CUDA else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = dist.group.WORLD
        gen = torch.Generator().manual_seed(3)
        dtype = torch.bfloat16
        q = torch.randn(2, 300, 8, 64, generator=gen).to(dtype)
        k, v = (torch.randn(2, 300, 2, 64, generator=gen).to(dtype) for _ in range(2))
        dout = torch.randn(2, 300, 8, 64, generator=gen).to(dtype)
        ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
        o_ref, _ = attention_ref(*ref_in, causal=True)
        o_ref.backward(dout.double())
        strategies = {
            "ring": lambda *a: ring_attention(*a, group=g, causal=True),
            "allgather": lambda *a: allgather_attention(*a, group=g, causal=True),
            "ulysses": lambda *a: ulysses_attention(*a, group=g, causal=True),
            "usp": lambda *a: usp_attention(*a, ulysses_group=g, ring_group=g, causal=True),
        }
        for name, fn in strategies.items():
            gpu_in = [t.to(DEV, copy=True).requires_grad_(True) for t in (q, k, v)]
            out = fn(*gpu_in)
            out.backward(dout.to(DEV))
            assert_close(f"{name} out", o_ref, out, dtype)
            for gname, r, x in zip(("dq", "dk", "dv"), ref_in, gpu_in):
                assert_close(f"{name} {gname}", r.grad, x.grad, dtype)
        # LASP-2 (linear) with per-head decay
        qh, kh, vh, dh = (torch.randn(2, 300, 4, 64, generator=gen).to(dtype) for _ in range(4))
        decay = torch.tensor([-1.0, -0.1, -0.01, -0.001])
        ref_in = [t.double().requires_grad_(True) for t in (qh, kh, vh)]
        o_ref, _ = linear_attn_recurrent(*ref_in, decay=decay.double())
        o_ref.backward(dh.double())
        gpu_in = [t.to(DEV, copy=True).requires_grad_(True) for t in (qh, kh, vh)]
        out = lasp2_attention(*gpu_in, group=g, decay=decay.to(DEV))
        out.backward(dh.to(DEV))
        assert_close("lasp2 out", o_ref, out, dtype)
        for gname, r, x in zip(("dq", "dk", "dv"), ref_in, gpu_in):
            assert_close(f"lasp2 {gname}", r.grad, x.grad, dtype)
    finally:
        if own:
            dist.destroy_process_group()


SDPA_CASES = [  # (id, Sq, Sk, causal, q_offset, k_offset, cu_seqlens, window): every one on the fast path
    ("diag-causal", 517, 517, True, 0, 0, None, None),
    ("full", 129, 700, False, 0, 0, None, None),
    ("causal-bottom-right", 129, 300, True, 171, 0, None, None),
    ("causal-trailing-keys-empty-rows", 100, 300, True, 0, 20, None, None),
    ("docs-diag", 517, 517, True, 0, 0, (0, 1, 100, 100, 300, 517), None),
    ("docs-window-diag", 517, 517, True, 0, 0, (0, 200, 517), 64),
    ("window-diag", 300, 300, True, 0, 0, None, 17),
    ("docs-allgather-chunk", 129, 700, True, 300, 0, (0, 50, 350, 700), None),
    ("docs-full-empty-rows", 129, 200, False, 0, 400, (0, 100, 450, 700), None),
    ("docs-all-visible", 64, 200, True, 300, 0, (0, 120, 330, 700), None),
]


@needs_cuda
@pytest.mark.skipif(not CUDA, reason="torch's CUDA flash ops")
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: c[0])
def test_cuda_sdpa_fast_path_vs_fp64(case):
    """torch's flash ops behind the SoftmaxKernel contract (varlen form, GQA, LSE layout), no fallback:
    this checks the rule sdpa_kernel.py relies on (bottom-right causal/window per segment, +inf LSE and
    zero output for rows without keys, zero dK/dV for keys without queries)."""
    from dist_attn.kernels.flash_attn import softmax_kernel
    from dist_attn.kernels.flash_attn.naive import attention_ref
    from dist_attn.kernels.flash_attn.sdpa_kernel import sdpa_softmax_kernel

    class Refuse:
        name = "refuse"

        def fwd(self, *a, **k):
            raise AssertionError("fallback used for a covered call")
        bwd = fwd
    _, sq, sk, causal, qo, ko, cu, window = case
    kw = dict(causal=causal, q_offset=qo, k_offset=ko, window_size=window,
              cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV))
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    q, dout = (torch.randn(2, sq, 8, 128, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, sk, 2, 128, generator=gen).to(dtype) for _ in range(2))
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref, **{**kw, "cu_seqlens": None if cu is None else torch.tensor(cu)})
    o_ref.backward(dout.double())
    kern = sdpa_softmax_kernel(fallback=Refuse())
    qd, kd, vd = q.to(DEV), k.to(DEV), v.to(DEV)
    out, lse = kern.fwd(qd, kd, vd, **kw)
    grads = kern.bwd(dout.to(DEV), qd, kd, vd, out, lse, **kw)
    assert_close("out", o_ref, out, dtype)
    assert_close("lse", l_ref, lse, dtype)
    for name, r, g in zip(("dq", "dk", "dv"), ref, grads):
        assert_close(name, r.grad, g, dtype)
    auto_out, auto_lse = softmax_kernel("auto").fwd(qd, kd, vd, **kw)  # torch's op or ours, per the table
    assert_close("auto out", o_ref, auto_out, dtype)
    assert_close("auto lse", l_ref, auto_lse, dtype)


# --- the kernel sweep's documents/window cases (CPU: the masks and the table logic) -----------------
@pytest.mark.parametrize("mask", ["docs", "window"])
def test_kernel_sweep_masked_ops_agree_and_count_visible_pairs(mask):
    """benchmarks/kernels.py: ours, SDPA with the boolean mask and FlexAttention's block mask compute
    the same attention for a docs/window point, and the FLOP count uses exactly the visible pairs."""
    from benchmarks import kernels_masked as kb
    from dist_attn.kernels.flash_attn.naive import document_mask
    s = 96
    spec = kb.mask_spec(mask, s)
    cu = spec["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == s and (cu[1:] > cu[:-1]).all()
    assert kb.visible_pairs(s, spec) == int(document_mask(s, s, 0, 0, True, cu, spec["window_size"]).sum())
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, s, 2, 16, generator=gen) for _ in range(3))
    outs = {}
    for op in ("flash_attn", "sdpa", "flex"):
        try:
            layout, fn = kb.make_masked_op(op, spec, s, torch.device("cpu"))
        except ImportError:
            continue
        args = (q, k, v) if layout == "bshd" else tuple(t.transpose(1, 2) for t in (q, k, v))
        out = fn(*args, None)
        outs[op] = out if layout == "bshd" else out.transpose(1, 2)
    assert "flash_attn" in outs and "sdpa" in outs
    for op, out in outs.items():
        assert_close(f"{op} vs ours", outs["flash_attn"].double(), out, torch.float32)


def test_kernel_sweep_select_table_rows():
    from benchmarks import kernels as kb
    from benchmarks.kernels_masked import select_rows
    rows = [dict(op="flash_attn", mode="fwd+bwd", mask="docs", D=128, dtype="bfloat16", S=8192, ms=2.0),
            dict(op="sdpa_kernel", mode="fwd+bwd", mask="docs", D=128, dtype="bfloat16", S=8192, ms=1.5),
            dict(op="sdpa_kernel", mode="fwd", mask="docs", D=128, dtype="bfloat16", S=8192, ms=9.0),
            dict(op="flash_attn", mode="fwd+bwd", mask="causal", D=64, dtype="bfloat16", S=2048, ms=1.0),
            dict(op="sdpa_kernel", mode="fwd+bwd", mask="causal", D=64, dtype="bfloat16", S=2048, ms=None)]
    assert select_rows(rows) == [dict(mask="docs", D=128, dtype="bfloat16", S=8192, winner="sdpa",
                                         ms={"ours": 2.0, "sdpa": 1.5})]
    pts = kb.gpu_check_points()
    first_masked = next(i for i, p in enumerate(pts) if p[4] is not None)
    assert pts[0] == ("flash_attn", 8192, 128, True, None) and first_masked > 10
    assert {p[4] for p in pts} == {None, "docs", "window"} and all(len(p) == 5 for p in pts)
