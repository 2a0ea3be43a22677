"""The plain-torch references checked against each other and against first principles."""
import pytest
import torch

from dist_attn.kernels.flash_attn.naive import attention_ref
from dist_attn.kernels.lightning_attn.naive import linear_attn_chunked, linear_attn_recurrent
from tests.utils import assert_close


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_ref_matches_softmax(causal):
    q, k, v = (torch.randn(2, 7, 4, 16, dtype=torch.float64) for _ in range(3))
    out, lse = attention_ref(q, k, v, causal=causal)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    if causal:
        s = s.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    assert_close("out", torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), out)
    assert_close("lse", s.logsumexp(-1), lse)


def test_attention_ref_empty_rows_no_nan():
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention_ref(q, k, v, causal=True, q_offset=0, k_offset=3)  # rows 0..2 see nothing
    assert torch.isinf(lse[:, :, :3]).all() and (out[:, :3] == 0).all()
    (out.sum() + lse[:, :, 3:].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("s,chunk", [(1, 16), (63, 16), (64, 64), (100, 32)])
def test_linear_recurrent_vs_chunked(s, chunk):
    q, k = (torch.randn(2, s, 3, 12, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, s, 3, 20, dtype=torch.float64)
    decay = -torch.rand(3, dtype=torch.float64)
    s0 = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    o1, st1 = linear_attn_recurrent(q, k, v, decay=decay, initial_state=s0)
    o2, st2 = linear_attn_chunked(q, k, v, decay=decay, initial_state=s0, chunk_size=chunk)
    assert_close("out", o1, o2)
    assert_close("state", st1, st2)


@pytest.mark.parametrize("s,chunk,cu", [(1, 16, [0, 1]), (63, 16, [0, 1, 16, 17, 40, 40, 63]), (100, 32, [0, 50, 100]),
                                        (100, 64, None)], ids=["S1", "S63-docs", "S100-2docs", "S100-nodocs"])
def test_linear_gated_documents_recurrent_vs_chunked(s, chunk, cu):
    """Per-token gates and document resets: outputs, final state and every gradient (g included)."""
    q, k = (torch.randn(2, s, 3, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, s, 3, 20, dtype=torch.float64, requires_grad=True)
    g = (-torch.rand(2, s, 3, dtype=torch.float64)).requires_grad_(True)
    s0 = torch.randn(2, 3, 12, 20, dtype=torch.float64, requires_grad=True)
    decay = -torch.rand(3, dtype=torch.float64)
    cu = None if cu is None else torch.tensor(cu)
    wo, ws = torch.randn(2, s, 3, 20, dtype=torch.float64), torch.randn(2, 3, 12, 20, dtype=torch.float64)
    res = []
    for fn in (linear_attn_recurrent, lambda *a, **kw: linear_attn_chunked(*a, chunk_size=chunk, **kw)):
        o, st = fn(q, k, v, decay=decay, initial_state=s0, g=g, cu_seqlens=cu)
        res.append([o, st] + list(torch.autograd.grad((o * wo).sum() + (st * ws).sum(), (q, k, v, s0, g))))
    for name, a, b in zip(("out", "state", "dq", "dk", "dv", "ds0", "dg"), *res):
        assert_close(name, a, b)


def test_linear_recurrent_matches_fla_naive_simple_gla():
    """Our gated recurrence (fp64) against flash-linear-attention's own naive simple-GLA recurrence
    (which computes in fp32): per-token log gate, initial and final state, every gradient."""
    pytest.importorskip("fla", reason="fla-core (dev dependency) not installed")
    try:
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    except (ImportError, RuntimeError) as e:  # a build whose import needs CUDA
        pytest.skip(f"fla.ops.simple_gla.naive not importable on CPU: {e}")
    b, s, h, dk, dv = 2, 50, 2, 16, 8
    q, k = (torch.randn(b, s, h, dk, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, s, h, dv, dtype=torch.float64)
    g = -torch.rand(b, s, h, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, dtype=torch.float64)
    wo, ws = torch.randn(b, s, h, dv, dtype=torch.float64), torch.randn(b, h, dk, dv, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.clone().to(dtype).requires_grad_(True) for t in (q, k, v, g, s0)]
        o, st = fn(*leaves)
        grads = torch.autograd.grad((o.double() * wo).sum() + (st.double() * ws).sum(), leaves)
        return [o, st] + list(grads)

    ours = run(lambda q, k, v, g, s0: linear_attn_recurrent(q, k, v, g=g, initial_state=s0), torch.float64)
    theirs = run(lambda q, k, v, g, s0: naive_recurrent_simple_gla(q, k, v, g, initial_state=s0,
                                                                    output_final_state=True), torch.float32)
    for name, a, b_ in zip(("out", "state", "dq", "dk", "dv", "dg", "ds0"), ours, theirs):
        assert_close(name, a, b_, torch.float32)
