"""Lightning attention (torch backend) with per-token gates ``g`` and packed documents ``cu_seqlens``.

Every case checks out, final_state and dq, dk, dv, dinitial_state, dg of a loss that uses both out
and final_state against the step-by-step recurrence (``naive.linear_attn_recurrent``) run in fp64 on
the same (dtype-rounded) inputs. S = 200 spans four 64-token chunks with a partial last one; Dk != Dv.
Document sets: 1-token documents (first, inside, last), starts exactly on the 64-token chunk boundaries,
an empty document (repeated offset), only the start at 0 (= no documents), and many short documents.
"""
import pytest
import torch

from dist_attn.kernels.interface import linear_kernel_from_autograd
from dist_attn.kernels.lightning_attn import lightning_attn, linear_kernel
from dist_attn.kernels.lightning_attn.naive import linear_attn_chunked, linear_attn_recurrent
from tests.utils import assert_close

B, H, S, DK, DV = 2, 2, 200, 16, 24
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
DOCS = {
    "nodocs": None,
    "tiny_and_boundary": [0, 1, 2, 64, 65, 100, 128, 128, 199, 200],
    "start0_only": [0, 200],
    "boundary_only": [0, 64, 200],
    "many": list(range(0, 200, 9)) + [200],
}
NAMES = ("out", "final_state", "dq", "dk", "dv", "dinitial_state", "dg")


def _inputs(dtype, gated, docs, s=S, g_scale=0.4, seed=0, g_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, s, H, DK, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, s, H, DV, generator=gen).to(dtype)
    decay = (-0.05 - 0.2 * torch.rand(H, generator=gen)).to(torch.promote_types(dtype, F32))
    g_dtype = g_dtype or torch.promote_types(dtype, F32)  # fp32 gates for fp32/bf16 q, fp64 for fp64
    g = (-g_scale * torch.rand(B, s, H, generator=gen)).to(g_dtype) if gated else None
    s0 = torch.randn(B, H, DK, DV, generator=gen, dtype=torch.promote_types(dtype, F32))
    cu = None if DOCS[docs] is None else torch.tensor([min(t, s) for t in DOCS[docs]], dtype=torch.int32)
    wo = torch.randn(B, s, H, DV, generator=gen).to(dtype).double()  # representable in dtype
    ws = torch.randn(B, H, DK, DV, generator=gen).double()
    return q, k, v, decay, g, s0, cu, wo, ws


def _run(fn, q, k, v, decay, g, s0, cu, wo, ws, wdtype=None):
    """Forward + backward of <out, wo> + <final_state, ws>; returns [out, state, dq, dk, dv, ds0, dg]."""
    leaves = [t.detach().clone().to(wdtype or t.dtype).requires_grad_(True) for t in (q, k, v, s0)]
    gl = None if g is None else g.detach().clone().to(wdtype or g.dtype).requires_grad_(True)
    dec = decay.to(wdtype or decay.dtype)
    out, state = fn(*leaves[:3], decay=dec, initial_state=leaves[3], g=gl, cu_seqlens=cu)
    loss = (out.double() * wo).sum() + (state.double() * ws).sum()
    grads = torch.autograd.grad(loss, leaves + ([gl] if gl is not None else []))
    return [out, state] + list(grads)


def _compare(got, ref, dtype, tag):
    for name, r, x in zip(NAMES, ref, got):
        assert_close(f"{tag} {name}", r, x, dtype)


CASES = [(d, gated) for d in DOCS for gated in (False, True)]


@pytest.mark.parametrize("docs,gated", CASES, ids=[f"{d}-{'g' if g else 'nog'}" for d, g in CASES])
def test_torch_kernel_matches_recurrence(docs, gated):
    """One fp64 reference on bf16-representable inputs, the kernel run in fp64, fp32 and bf16."""
    args = _inputs(BF16, gated, docs)
    args = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    ref = _run(linear_attn_recurrent, *args, wdtype=F64)
    for dtype in (F64, F32, BF16):
        q, k, v = (t.to(dtype) for t in args[:3])
        wide = torch.promote_types(dtype, F32)  # decay, g, initial state in fp32 (fp64 for fp64 q)
        decay, g, s0 = (None if t is None else t.to(wide) for t in args[3:6])
        got = _run(linear_kernel("torch"), q, k, v, decay, g, s0, *args[6:])
        assert got[0].dtype == dtype and got[1].dtype == wide
        if gated:
            assert got[6].dtype == wide and got[6].shape == (B, S, H)
        _compare(got, ref, dtype, f"{docs} {dtype}")


def test_gate_in_bf16_and_fp16_keeps_its_dtype():
    for dtype in (BF16, torch.float16):
        args = _inputs(dtype, True, "tiny_and_boundary", g_dtype=dtype)
        got = _run(linear_kernel("torch"), *args)
        assert got[6].dtype == dtype
        _compare(got, _run(linear_attn_recurrent, *args, wdtype=F64), dtype, str(dtype))


def test_start_zero_only_equals_no_documents_and_starts_cut_state():
    q, k, v, decay, g, s0, _, _, _ = _inputs(F64, True, "nodocs")
    kern = linear_kernel("torch")
    plain = kern.fwd(q, k, v, decay=decay, g=g, initial_state=s0, scale=None)
    same = kern.fwd(q, k, v, decay=decay, g=g, initial_state=s0, scale=None, cu_seqlens=torch.tensor([0, S]))
    assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])
    # a start at 64: tokens from 64 on are those of a fresh call on q[:, 64:] without initial state
    out, state = kern.fwd(q, k, v, decay=decay, g=g, initial_state=s0, scale=None,
                          cu_seqlens=torch.tensor([0, 64, S], dtype=torch.int64))
    tail, tail_state = kern.fwd(q[:, 64:], k[:, 64:], v[:, 64:], decay=decay, g=g[:, 64:], initial_state=None,
                                scale=None)
    assert_close("tail out", tail, out[:, 64:])
    assert_close("tail state", tail_state, state)


def test_strong_gates_no_overflow():
    """Cumulative log gates far below the fp32 exp range (g = -30 per token, decay -5) stay finite."""
    q, k, v, decay, g, s0, cu, wo, ws = _inputs(F32, True, "tiny_and_boundary", s=150, g_scale=60.0)
    decay = torch.tensor([-5.0, -0.001])
    ref = _run(linear_attn_recurrent, q, k, v, decay, g, s0, cu, wo, ws, wdtype=F64)
    got = _run(linear_kernel("torch"), q, k, v, decay, g, s0, cu, wo, ws)
    _compare(got, ref, F32, "strong")


def test_autograd_wrapper_and_public_api_pass_gates_and_documents():
    """linear_kernel_from_autograd(naive chunked) and lightning_attn(...) with g and cu_seqlens."""
    q, k, v, decay, g, s0, cu, wo, ws = _inputs(F64, True, "tiny_and_boundary")
    wrapped = linear_kernel_from_autograd("naive16", lambda *a, **kw: linear_attn_chunked(*a, chunk_size=16, **kw))
    fwd = wrapped.fwd(q, k, v, decay=decay, initial_state=s0, scale=None, g=g, cu_seqlens=cu)
    grads = wrapped.bwd(wo, ws, q, k, v, decay=decay, initial_state=s0, scale=None, g=g, cu_seqlens=cu)
    ref = _run(linear_attn_recurrent, q, k, v, decay, g, s0, cu, wo, ws, wdtype=F64)
    _compare(list(fwd) + list(grads), ref, F64, "wrapped")

    def public(q, k, v, **kw):
        return lightning_attn(q, k, v, output_final_state=True, backend="torch", **kw)
    _compare(_run(public, q, k, v, decay, g, s0, cu, wo, ws), ref, F64, "lightning_attn")


def _bad(**over):
    args = dict(q=torch.randn(2, 5, 2, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 4),
                decay=-torch.rand(2), initial_state=None, g=-torch.rand(2, 5, 2), cu_seqlens=torch.tensor([0, 2, 5]))
    args.update(over)
    return args


BAD = {
    "g-shape": (_bad(g=-torch.rand(2, 5)), "g expected a float tensor"),
    "g-int": (_bad(g=torch.zeros(2, 5, 2, dtype=torch.int64)), "g expected a float tensor"),
    "g-positive": (_bad(g=torch.full((2, 5, 2), 0.1)), "log gates <= 0"),
    "g-nan": (_bad(g=torch.full((2, 5, 2), float("nan"))), "log gates <= 0"),
    "g-device": (_bad(g=-torch.rand(2, 5, 2, device="meta")), "one device"),
    "cu-float": (_bad(cu_seqlens=torch.tensor([0.0, 5.0])), "1-D int32/int64"),
    "cu-2d": (_bad(cu_seqlens=torch.tensor([[0, 5]])), "1-D int32/int64"),
    "cu-short": (_bad(cu_seqlens=torch.tensor([0])), "1-D int32/int64"),
    "cu-not-zero": (_bad(cu_seqlens=torch.tensor([1, 5])), "from 0 to S = 5"),
    "cu-not-s": (_bad(cu_seqlens=torch.tensor([0, 2, 4])), "from 0 to S = 5"),
    "cu-decreasing": (_bad(cu_seqlens=torch.tensor([0, 3, 2, 5])), "non-decreasing"),
    "cu-device": (_bad(cu_seqlens=torch.tensor([0, 5], device="meta")), "on the CPU or"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_value_errors(name):
    args, match = BAD[name]
    with pytest.raises(ValueError, match=match) as err:
        linear_kernel("torch").fwd(**args, scale=None)
    assert "expected" in str(err.value) and "got" in str(err.value) and "Fix:" in str(err.value)
