"""The online-softmax merge against a direct logsumexp combination and against attention over the
union of the keys; rows that saw no key; extreme lse; in-place accumulation into query slices."""
import pytest
import torch

from dist_attn.merge import empty_accumulators, merge_attn, merge_into
from dist_attn.kernels.flash_attn.naive import attention_ref
from tests.utils import assert_close

NEG_INF = float("-inf")


def _direct(o1, lse1, o2, lse2):
    """lse = log(exp(lse1) + exp(lse2)), o = sum_i exp(lse_i - lse) o_i, in fp64 via logsumexp."""
    o1, o2, lse1, lse2 = (t.double() for t in (o1, o2, lse1, lse2))
    lse = torch.logsumexp(torch.stack([lse1, lse2]), dim=0)
    w1 = torch.exp(lse1 - lse).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).transpose(1, 2).unsqueeze(-1)
    return w1 * o1 + w2 * o2, lse


def _partials(b=2, s=7, h=3, d=5, spread=3.0, dtype=torch.float32):
    o1, o2 = torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, h, d, dtype=dtype)
    lse1, lse2 = spread * torch.randn(b, h, s), spread * torch.randn(b, h, s)
    return o1, lse1, o2, lse2


@pytest.mark.parametrize("spread", [0.1, 3.0, 40.0], ids=lambda x: f"spread{x}")
def test_merge_matches_direct_logsumexp(spread):
    o1, lse1, o2, lse2 = _partials(spread=spread)
    o, lse = merge_attn(o1, lse1, o2, lse2)
    o_ref, lse_ref = _direct(o1, lse1, o2, lse2)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close("o", o_ref, o)
    assert_close("lse", lse_ref, lse)


def test_merge_is_commutative_and_associative():
    o1, lse1, o2, lse2 = _partials()
    o3, lse3 = torch.randn_like(o1), torch.randn_like(lse1)
    a = merge_attn(*merge_attn(o1, lse1, o2, lse2), o3, lse3)
    b = merge_attn(o1, lse1, *merge_attn(o3, lse3, o2, lse2))
    c = merge_attn(o2, lse2, o1, lse1)
    d = merge_attn(o1, lse1, o2, lse2)
    for x, y in ((a, b), (c, d)):
        assert_close("o", x[0].double(), y[0])
        assert_close("lse", x[1].double(), y[1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merge_equals_attention_over_union_of_keys(causal):
    # split the keys [0, 11) into [0, 4) and [4, 11): merging the two partial results must equal
    # attention over all of them (a causal mask makes some query rows empty in the second part)
    b, s, h, d = 2, 11, 3, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    ref_o, ref_lse = attention_ref(q, k, v, causal=causal)
    o1, l1 = attention_ref(q, k[:, :4], v[:, :4], causal=causal, k_offset=0)
    o2, l2 = attention_ref(q, k[:, 4:], v[:, 4:], causal=causal, k_offset=4)
    if causal:
        assert torch.isinf(l2[:, :, :4]).all()  # queries 0..3 see none of keys 4..10
    o, lse = merge_attn(o1, l1, o2, l2)
    assert o.dtype == torch.float64
    assert_close("o", ref_o, o)
    assert_close("lse", ref_lse, lse)


def test_rows_without_keys():
    o1, lse1, o2, lse2 = _partials(b=1, s=4, h=2, d=3)
    o1[:, 0], lse1[:, :, 0] = 0.0, NEG_INF  # row 0: side 1 empty
    o2[:, 1], lse2[:, :, 1] = 0.0, NEG_INF  # row 1: side 2 empty
    o1[:, 2], lse1[:, :, 2] = 0.0, NEG_INF  # row 2: both empty
    o2[:, 2], lse2[:, :, 2] = 0.0, NEG_INF
    for t in (o1, lse1, o2, lse2):
        t.requires_grad_(True)
    o, lse = merge_attn(o1, lse1, o2, lse2)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(o[:, 0], o2[:, 0].detach()) and torch.equal(lse[:, :, 0], lse2[:, :, 0].detach())
    assert torch.equal(o[:, 1], o1[:, 1].detach()) and torch.equal(lse[:, :, 1], lse1[:, :, 1].detach())
    assert (o[:, 2] == 0).all() and (lse[:, :, 2] == NEG_INF).all()
    o_ref, lse_ref = _direct(o1.detach(), lse1.detach(), o2.detach(), lse2.detach())
    keep = [0, 1, 3]
    assert_close("o", o_ref[:, keep], o[:, keep])
    assert_close("lse", lse_ref[:, :, keep], lse[:, :, keep])
    # the merge is differentiable without NaN, also through the empty rows
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (o1, lse1, o2, lse2):
        assert not torch.isnan(t.grad).any()


def test_extreme_lse_no_overflow():
    # exp(lse) overflows fp32 at ~88; the stable form never exponentiates a large number
    o1, lse1, o2, lse2 = _partials(b=1, s=5, h=1, d=4)
    lse1, lse2 = lse1 + 1e4, lse2 + 1e4
    o, lse = merge_attn(o1, lse1, o2, lse2)
    o_ref, lse_ref = _direct(o1, lse1, o2, lse2)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert_close("o", o_ref, o)
    assert (lse - lse_ref).abs().max() < 1e-2  # fp32 spacing at 1e4 is 1e-3


def test_bf16_block_outputs_merge_in_fp32():
    o1, lse1, o2, lse2 = _partials(dtype=torch.bfloat16)
    o, lse = merge_attn(o1, lse1, o2, lse2)
    assert o.dtype == torch.float32
    o_ref, _ = _direct(o1, lse1, o2, lse2)  # exact combination of the bf16 values
    assert_close("o", o_ref, o, dtype=torch.float32)


def test_merge_into_accumulates_query_slices():
    b, s, h, d = 2, 10, 2, 4
    q = torch.randn(b, s, h, d)
    out, lse = empty_accumulators(q)
    assert out.dtype == torch.float32 and (out == 0).all() and (lse == NEG_INF).all()
    o1, lse1, o2, lse2 = _partials(b=b, s=s, h=h, d=d)
    merge_into(out, lse, o1, lse1)                        # merging into an empty row: the block itself
    assert torch.equal(out, o1) and torch.equal(lse, lse1)
    merge_into(out, lse, o2[:, 6:], lse2[:, :, 6:], slice(6, None))  # only rows 6..9 see block 2
    o_ref, lse_ref = _direct(o1, lse1, o2, lse2)
    assert torch.equal(out[:, :6], o1[:, :6]) and torch.equal(lse[:, :, :6], lse1[:, :, :6])
    assert_close("o rows 6..", o_ref[:, 6:], out[:, 6:])
    assert_close("lse rows 6..", lse_ref[:, :, 6:], lse[:, :, 6:])
