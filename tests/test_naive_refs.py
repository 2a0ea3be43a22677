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
