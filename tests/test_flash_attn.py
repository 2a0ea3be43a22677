"""flash_attn (Triton under the interpreter, and the blockwise torch backend) against the fp64 naive
reference: out, lse and dq/dk/dv of a loss that uses both out and lse, the ring-merge property of
``bwd``, and input validation; packed documents (``cu_seqlens``) and windows against the naive
reference with the mask built from the definition, and the skipping of invisible tiles.

Inputs are drawn in fp64 and rounded to the dtype under test; the reference runs in fp64 on the
rounded values, so only the kernel's own arithmetic is measured. Upstream gradients are rounded
the same way (dout to the dtype, dlse to fp32) so that both sides see identical inputs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dist_attn.kernels.flash_attn import flash_attn, softmax_kernel, torch_kernel
from dist_attn.kernels.flash_attn.naive import attention_ref
from tests.utils import assert_close

ROOT = Path(__file__).resolve().parents[1]
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# Triton runs on the GPU when there is one, else on CPU under the interpreter (see conftest.py).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


@dataclass(frozen=True)
class Case:
    id: str
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    causal: bool
    q_offset: int = 0
    k_offset: int = 0
    b: int = 2
    cu: tuple | None = None  # global document offsets (cu_seqlens)
    window: int | None = None


CASES = {c.id: c for c in [
    Case("full-sq63-sk200-mha-d64", 63, 200, 2, 2, 64, False),
    Case("causal-257-gqa-d128", 257, 257, 4, 2, 128, True),
    Case("causal-sq200-sk63-mqa-d96", 200, 63, 3, 1, 96, True),
    Case("causal-empty-rows-mqa-d32", 63, 200, 2, 1, 32, True, q_offset=0, k_offset=20),
    Case("causal-qoffset-partial-d64", 200, 257, 2, 2, 64, True, q_offset=100, k_offset=150),
    Case("causal-all-empty-d64", 63, 63, 2, 1, 64, True, q_offset=0, k_offset=100),
    Case("len1-causal-d64", 1, 1, 2, 2, 64, True),
    Case("decode-sq1-sk257-gqa-d128", 1, 257, 4, 2, 128, True, q_offset=256),
    Case("full-len1-sk63-d32", 1, 63, 2, 1, 32, False, b=1),
    Case("causal-200-full-visible-d128", 200, 200, 2, 1, 128, True, q_offset=300, k_offset=0),
    Case("causal-odd-head-dim-d48", 70, 90, 2, 1, 48, True, q_offset=30),  # padded to 64 in Triton
]}
ALL_DTYPES = [F64, F32, F16, BF16]


def _inputs(case: Case, dtype):
    """q, k, v rounded to ``dtype`` plus upstream weights w (for out) and c (for lse)."""
    q = torch.randn(case.b, case.sq, case.hq, case.d, dtype=F64).to(dtype)
    k = torch.randn(case.b, case.sk, case.hkv, case.d, dtype=F64).to(dtype)
    v = torch.randn(case.b, case.sk, case.hkv, case.d, dtype=F64).to(dtype)
    w = torch.randn(case.b, case.sq, case.hq, case.d, dtype=F64).to(dtype)
    c = torch.randn(case.b, case.hq, case.sq, dtype=F64).to(F32 if dtype != F64 else F64)
    return q, k, v, w, c


def _loss(out, lse, w, c):
    """sum(out * w) + sum(lse * c) over rows that saw a key (lse = -inf rows have no gradient)."""
    lse_finite = lse.masked_fill(torch.isinf(lse), 0.0)
    return (out.double() * w.double()).sum() + (lse_finite.double() * c.double()).sum()


def _check(case: Case, dtype, backend):
    q, k, v, w, c = _inputs(case, dtype)
    dev = _device(backend)
    kw = dict(causal=case.causal, q_offset=case.q_offset, k_offset=case.k_offset)
    if case.cu is not None or case.window is not None:
        kw.update(cu_seqlens=None if case.cu is None else torch.tensor(case.cu, dtype=torch.int32),
                  window_size=case.window)
    leaves = [t.detach().to(dev).requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attn(*leaves, return_lse=True, backend=backend, **kw)
    _loss(out, lse, w.to(dev), c.to(dev)).backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, **kw)
    _loss(ref_out, ref_lse, w, c).backward()

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (F64 if dtype == F64 else F32) and lse.shape == (case.b, case.hq, case.sq)
    assert_close("out", ref_out, out)
    assert_close("lse", ref_lse, lse)  # fp32 tolerance even for 16-bit inputs: lse is kept in fp32
    for name, ref, got in zip(("dq", "dk", "dv"), ref_leaves, leaves):
        assert got.grad.dtype == dtype
        assert_close(name, ref.grad, got.grad)
    empty = torch.isinf(ref_lse)  # rows that see no key: exactly zero output, finite gradients
    if empty.any():
        assert (out.transpose(1, 2).cpu()[empty] == 0).all()
        assert all(torch.isfinite(t.grad).all() for t in leaves)


# packed documents and windows: boundaries on the 64-token tile edge, 1-token and empty documents,
# offsets, windows 0 / small / large, GQA, rows that see no key (window past the key block)
DOC_CASES = {c.id: c for c in [
    Case("docs-causal-gqa", 150, 150, 4, 2, 32, True, cu=(0, 1, 64, 64, 100, 128, 150)),
    Case("docs-full-offsets-mqa", 70, 90, 2, 1, 32, False, q_offset=60, k_offset=50, cu=(0, 1, 64, 100, 101, 140, 200)),
    Case("window5-offsets", 150, 130, 2, 2, 32, True, q_offset=20, k_offset=0, window=5),
    Case("window0-docs", 90, 90, 2, 1, 16, True, cu=(0, 3, 64, 90), window=0),
    Case("window100-docs-offsets", 100, 200, 4, 1, 32, True, q_offset=100, k_offset=0, cu=(0, 64, 65, 190, 256),
         window=100),
    Case("window-empty-rows", 40, 80, 2, 1, 32, True, q_offset=70, k_offset=0, cu=(0, 60, 200), window=15, b=1),
]}
DOC_DTYPES = [F64, F32, BF16]


@pytest.mark.parametrize("dtype", DOC_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", DOC_CASES.values(), ids=lambda c: c.id)
def test_torch_backend_documents_and_windows(case, dtype, small_torch_blocks):
    _check(case, dtype, "torch")


@pytest.mark.parametrize("case_id,dtype", [("docs-full-offsets-mqa", F32), ("window0-docs", F32),
                                           ("window-empty-rows", BF16)], ids=lambda x: str(x).replace("torch.", ""))
def test_triton_backend_documents_and_windows(case_id, dtype):
    _check(DOC_CASES[case_id], dtype, "triton")


def test_documents_skip_invisible_tiles(monkeypatch):
    """The torch backend visits only tiles that meet some row's interval: with a window of 5 over 512
    tokens (64-token tiles) that is the diagonal tile and its left neighbour, not the causal triangle."""
    monkeypatch.setattr(torch_kernel, "_MAX_TILE_ELEMS", 1)
    q = torch.randn(1, 512, 1, 16)
    seen = []
    orig = torch_kernel._tile_plan

    def spy(*a, **kw):
        tiles = list(orig(*a, **kw))
        seen.extend((t[0], t[2]) for t in tiles)
        return tiles
    monkeypatch.setattr(torch_kernel, "_tile_plan", spy)
    torch_kernel.fwd(q, q, q, causal=True, window_size=5)
    assert sorted(seen) == sorted([(i, i) for i in range(0, 512, 64)] + [(i, i - 64) for i in range(64, 512, 64)])
    seen.clear()
    torch_kernel.fwd(q, q, q, causal=True, cu_seqlens=torch.tensor([0, 64, 128, 512]))
    assert (0, 64) not in seen and (64, 0) not in seen and (128, 64) not in seen and (448, 128) in seen


def test_bad_documents_and_windows_raise_value_error():
    q = torch.zeros(1, 8, 2, 16)
    kern = softmax_kernel("torch")
    for kw, phrase in [(dict(cu_seqlens=torch.tensor([0.0, 8.0])), "int32/int64"),
                       (dict(cu_seqlens=torch.tensor([1, 8])), "start at 0"),
                       (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), "never decrease"),
                       (dict(cu_seqlens=torch.tensor([0, 6])), "inside"),
                       (dict(window_size=-1), "int >= 0"),
                       (dict(window_size=3, causal=False), "causal=True")]:
        kw = dict(dict(causal=True, softmax_scale=None, q_offset=0, k_offset=0), **kw)
        with pytest.raises(ValueError, match=phrase):
            kern.fwd(q, q, q, **kw)


# --- torch backend: every case x every dtype, with 64 x 64 tiles so all tile paths run ----------
@pytest.fixture
def small_torch_blocks(monkeypatch):
    monkeypatch.setattr(torch_kernel, "_MAX_TILE_ELEMS", 1)  # smallest tiles (64 x 64)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES.values(), ids=lambda c: c.id)
def test_torch_backend_vs_fp64_reference(case, dtype, small_torch_blocks):
    _check(case, dtype, "torch")


def test_torch_backend_default_block_size():
    _check(CASES["causal-257-gqa-d128"], F64, "torch")


# --- triton backend (interpreter on CPU): every case in fp32 and bf16, fp16 once -------------------
# bf16 included: the interpreter's bf16 dot bug is worked around, not skipped. fp16 takes the same kernel
# path as bf16 (only the element type differs), so one fp16 case keeps it covered without a third grid.
TRITON_GRID = [(c, d) for c in CASES.values() for d in (F32, BF16)] + [(CASES["causal-qoffset-partial-d64"], F16)]


@pytest.mark.parametrize("case,dtype", TRITON_GRID, ids=[f"{c.id}-{str(d)[6:]}" for c, d in TRITON_GRID])
def test_triton_backend_vs_fp64_reference(case, dtype):
    _check(case, dtype, "triton")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case_id", ["causal-qoffset-partial-d64", "causal-sq200-sk63-mqa-d96"])
def test_triton_gpu_tile_shapes(case_id, dtype, monkeypatch):
    """The GPU tiles (BLOCK_M != BLOCK_N, e.g. 32 x 128 for dK/dV) under the interpreter."""
    from dist_attn.kernels.flash_attn import triton_kernel
    monkeypatch.setattr(triton_kernel, "_config", triton_kernel.gpu_config)
    _check(CASES[case_id], dtype, "triton")


SMALL_GRID_CASES = {"gqa3-offsets": Case("gqa3-offsets", 70, 90, 3, 1, 32, True, q_offset=30)}


@pytest.mark.parametrize("case_id,dtype", [("gqa3-offsets", BF16), ("docs-causal-gqa", F32)])
def test_triton_small_grid_rules(case_id, dtype, monkeypatch):
    """Small-grid tiles (64-row/64-key resident tiles) and the dK/dV GQA head split (repeated K/V,
    fp32 partials summed) under the interpreter, forced by a huge SM count."""
    from dist_attn.kernels.flash_attn import triton_kernel
    monkeypatch.setattr(triton_kernel, "_config", triton_kernel.gpu_config)
    monkeypatch.setattr(triton_kernel, "_sms", lambda device: 10 ** 6)
    case = SMALL_GRID_CASES.get(case_id) or DOC_CASES[case_id]
    assert triton_kernel.gqa_split(case.sk, case.b * case.hkv, case.hq // case.hkv, sms=10 ** 6) == case.hq // case.hkv
    _check(case, dtype, "triton")


def test_small_grid_heuristic_choices():
    from dist_attn.kernels.flash_attn.triton_kernel import gpu_config, gqa_split
    bf = torch.bfloat16
    big = gpu_config("fwd", 128, bf, 8192, 2 * 16)  # 64 x 32 = 2048 programs: the default tiles
    assert big == gpu_config("fwd", 128, bf) and big["BLOCK_M"] == 128
    small = gpu_config("fwd", 128, bf, 1024, 16)  # a ring shard: 8 x 16 = 128 programs < 2 x 132
    assert small["BLOCK_M"] == 64 and small["num_warps"] == 8  # D=128 forward: 4 warps spilled
    assert gpu_config("fwd", 64, bf, 1024, 16)["num_warps"] == 4
    assert gpu_config("dq", 64, bf, 1024, 16)["BLOCK_M"] == 64
    assert gpu_config("dkdv", 128, bf, 1024, 4 * 4)["BLOCK_N"] == 64
    assert gpu_config("fwd", 128, bf, 1024, 16, sms=32)["BLOCK_M"] == 128  # a smaller GPU: two waves reached
    assert gqa_split(8192, 2 * 4, 4) == 1                 # 64 x 8 = 512 programs
    assert gqa_split(1024, 4, 4) == 4                     # 32 programs: split all 4 heads
    assert gqa_split(4096, 4, 8) == 4                     # 128 x 4 >= 264: the smallest divisor that suffices
    assert gqa_split(1024, 4, 1) == 1 and gqa_split(1024, 4, 3) == 3


# --- the real (non-interpreted) compiler: the kernels lower to sm_90 cubins without a GPU ---------
def compile_for_sm90(dtype_name: str, block_d: int, causal: bool, intervals: bool = False) -> None:
    """Compile every flash-attn kernel with the GPU tile heuristic for an H100 target (run in a
    process without TRITON_INTERPRET, where ``triton.jit`` builds compilable kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dist_attn.kernels.flash_attn.triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess
    from dist_attn.kernels.flash_attn.triton_fwd import _attn_fwd
    from dist_attn.kernels.flash_attn.triton_kernel import gpu_config

    tt = dtype_name  # Triton's pointer type names: bf16, fp16, fp32
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    fp32_ptrs = {"LSE", "DLSE", "DELTA", "LSE2"}
    i32_ptrs = {"LO", "HI", "QLO", "QHI"}
    for fn, kind in ((_attn_fwd, "fwd"), (_bwd_preprocess, None), (_attn_bwd_dkdv, "dkdv"), (_attn_bwd_dq, "dq")):
        if kind is None:
            consts, opts = dict(HAS_DLSE=True, BLOCK_M=64, BLOCK_D=block_d), {}
        else:
            cfg = gpu_config(kind, block_d, torch_dtype)
            consts = dict(CAUSAL=causal, INTERVALS=intervals, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_D=block_d, DOT_FP32=False)
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in fp32_ptrs:
                sig[name] = "*fp32"
            elif name in i32_ptrs:
                sig[name] = "*i32"
            elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[name] = "*" + tt
            else:
                sig[name] = "fp32" if name == "sm_scale" else "i32"
        triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)


# bf16 at the wrappers' own configurations (D 64/128, MHA and GQA, causal) is compiled, with spill and
# wgmma checks, by tests/test_kernels_aot.py; this adds the fp32 (tf32) path with document intervals.
@pytest.mark.parametrize("dtype_name,block_d,causal,intervals", [("fp32", 64, True, True)],
                         ids=["fp32-d64-documents"])
def test_triton_kernels_compile_for_sm90(dtype_name, block_d, causal, intervals, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache, so the compiler really runs
    code = (f"from tests.test_flash_attn import compile_for_sm90; "
            f"compile_for_sm90({dtype_name!r}, {block_d}, {causal}, {intervals})")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


# --- ring-merge property: bwd on each key block with the MERGED out/lse sums to the full grads ----
def _merge(o1, l1, o2, l2):
    """Merge two partial results over disjoint keys through their LSEs (stable, -inf safe)."""
    lse = torch.logaddexp(l1, l2)
    lse_safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w1 = torch.exp(l1 - lse_safe).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1), 0 where l1 = -inf
    w2 = torch.exp(l2 - lse_safe).transpose(1, 2).unsqueeze(-1)
    out = w1 * o1.to(lse.dtype) + w2 * o2.to(lse.dtype)
    return out, lse


@pytest.mark.parametrize("backend,dtype,masked", [("torch", F64, False), ("torch", BF16, False), ("triton", F32, False),
                                                  ("triton", BF16, False), ("torch", F64, True), ("triton", F32, True)],
                         ids=["torch-float64", "torch-bfloat16", "triton-float32", "triton-bfloat16",
                              "torch-float64-documents-window", "triton-float32-documents-window"])
def test_bwd_with_merged_out_lse_gives_block_share(backend, dtype, masked, small_torch_blocks):
    # queries at positions 50..149, keys 0..199 split at 90: rows 0..39 see nothing of block 2,
    # and block 2 is partly masked, so both the empty-row and the partial paths are exercised.
    # masked: documents with a boundary inside each block and a window (a ring step with documents).
    case = Case("merge", 100, 200, 4, 2, 64, True, q_offset=50, k_offset=0)
    mask_kw = dict(cu_seqlens=torch.tensor([0, 70, 120, 200]), window_size=60) if masked else {}
    q, k, v, w, c = _inputs(case, dtype)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    q, k, v, w, c = (t.to(_device(backend)) for t in (q, k, v, w, c))
    kern = softmax_kernel(backend)
    split = 90
    blocks = [(k[:, :split], v[:, :split], 0), (k[:, split:], v[:, split:], split)]
    parts = [kern.fwd(q, kb, vb, causal=True, softmax_scale=None, q_offset=50, k_offset=ko, **mask_kw)
             for kb, vb, ko in blocks]
    out, lse = _merge(*parts[0], *parts[1])

    ref_out, ref_lse = attention_ref(*ref_leaves, causal=True, q_offset=50, **mask_kw)
    _loss(ref_out, ref_lse, w.cpu(), c.cpu()).backward()
    assert_close("merged out", ref_out, out.to(dtype))
    assert_close("merged lse", ref_lse, lse)

    dlse = c.masked_fill(torch.isinf(lse), 0.0)
    grads = [kern.bwd(w, q, kb, vb, out.to(dtype), lse, causal=True, softmax_scale=None, q_offset=50,
                      k_offset=ko, dlse=dlse, **mask_kw) for kb, vb, ko in blocks]
    assert_close("dq (sum of blocks)", ref_leaves[0].grad, grads[0][0] + grads[1][0])
    assert_close("dk (concat of blocks)", ref_leaves[1].grad, torch.cat([grads[0][1], grads[1][1]], 1))
    assert_close("dv (concat of blocks)", ref_leaves[2].grad, torch.cat([grads[0][2], grads[1][2]], 1))


# --- layout and API details -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs_and_custom_scale(backend):
    qh, kh, vh = (torch.randn(2, 2, 70, 64, device=_device(backend)) for _ in range(3))  # [B,H,S,D] storage
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))  # [B, S, H, D] views, not contiguous
    out, lse = flash_attn(q, k, v, causal=True, softmax_scale=0.3, return_lse=True, backend=backend)
    ref_out, ref_lse = attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True,
                                     softmax_scale=0.3)
    assert_close("out", ref_out, out)
    assert_close("lse", ref_lse, lse)


def test_kernel_object_is_differentiable_and_cached():
    kern = softmax_kernel("torch")
    assert softmax_kernel("torch") is kern
    # tiny on purpose: gradcheck perturbs every input element (2 forwards each). No empty rows here:
    # finite differences of lse = -inf are undefined.
    q = torch.randn(1, 5, 2, 32, dtype=F64, requires_grad=True)
    k, v = (torch.randn(1, 3, 1, 32, dtype=F64, requires_grad=True) for _ in range(2))
    torch.autograd.gradcheck(lambda a, b, c: kern(a, b, c, causal=True, q_offset=1), (q, k, v), atol=1e-7)


# --- validation: user mistakes raise ValueError naming expected / got / fix --------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "q-not-4d": ((_t(2, 8, 64), _t(2, 8, 2, 64), _t(2, 8, 2, 64)), "4-D"),
    "batch-mismatch": ((_t(2, 8, 2, 64), _t(3, 8, 2, 64), _t(3, 8, 2, 64)), "batch"),
    "head-dim-mismatch": ((_t(2, 8, 2, 64), _t(2, 8, 2, 32), _t(2, 8, 2, 32)), "head dim"),
    "k-v-shape-mismatch": ((_t(2, 8, 2, 64), _t(2, 8, 2, 64), _t(2, 9, 2, 64)), "same shape"),
    "hq-not-multiple-of-hkv": ((_t(2, 8, 3, 64), _t(2, 8, 2, 64), _t(2, 8, 2, 64)), "multiple"),
    "integer-dtype": ((_t(2, 8, 2, 64, dtype=torch.int32),) * 3, "dtype"),
    "mixed-dtypes": ((_t(2, 8, 2, 64), _t(2, 8, 2, 64, dtype=F16), _t(2, 8, 2, 64)), "dtype"),
    "different-devices": ((_t(2, 8, 2, 64), _t(2, 8, 2, 64, device="meta"), _t(2, 8, 2, 64)), "device"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_value_error(name, backend):
    args, phrase = BAD_INPUTS[name]
    args = tuple(a.to(_device(backend)) if a.device.type == "cpu" else a for a in args)
    with pytest.raises(ValueError, match=phrase) as err:
        softmax_kernel(backend).fwd(*args, causal=False, softmax_scale=None, q_offset=0, k_offset=0)
    assert "Fix:" in str(err.value)


def test_triton_rejects_float64_oversized_and_bad_backend_name():
    q = _t(1, 8, 2, 64, dtype=F64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        flash_attn(q, q, q, backend="triton")
    wide = _t(1, 8, 2, 160, device=TRITON_DEVICE)  # Triton tiles stop at D = 128; torch takes any D
    with pytest.raises(ValueError, match="head dim"):
        flash_attn(wide, wide, wide, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        softmax_kernel("cuda")
    big = torch.empty(1, 2 ** 20, 32, 128, dtype=BF16, device="meta")  # 2^32 elements: int32 row offsets overflow
    from dist_attn.kernels.flash_attn import triton_kernel
    with pytest.raises(ValueError, match="2\\^31"):
        triton_kernel.fwd(big, big, big)
