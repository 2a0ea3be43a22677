"""The torch-SDPA-backed softmax kernel (``kernels/flash_attn/sdpa_kernel.py``) on CPU.

torch's CUDA flash ops cannot run here; the CPU flash op (``fast_cpu=True``) takes the same fast path,
so these tests check which calls take it, the layout and LSE conventions, GQA, the merged-LSE backward
that ring attention relies on, and that everything else goes to the fallback kernel. The CUDA path is
checked against fp64 in ``tests/test_gpu_check.py`` on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from dist_attn.kernels.flash_attn import softmax_kernel
from dist_attn.kernels.flash_attn.naive import attention_ref
from dist_attn.kernels.flash_attn.sdpa_kernel import fast_mode, sdpa_softmax_kernel
from dist_attn.kernels.interface import SoftmaxKernel
from tests.utils import assert_close


def _t(b, s, h, d, dtype=torch.float32):
    return torch.randn(b, s, h, d).to(dtype)


@pytest.mark.parametrize("kw,expected", [
    (dict(causal=True, q_offset=0, k_offset=0), True),            # diagonal block
    (dict(causal=False, q_offset=5, k_offset=900), False),        # full: offsets do not matter
    (dict(causal=True, q_offset=300, k_offset=0), False),         # every key visible to every row
    (dict(causal=True, q_offset=100, k_offset=50), None),         # partially visible: ours
    (dict(causal=True, q_offset=0, k_offset=0, window_size=8), None),
    (dict(causal=True, q_offset=0, k_offset=0, cu_seqlens=torch.tensor([0, 5, 64])), None),
    (dict(causal=True, q_offset=0, k_offset=0, dlse=torch.zeros(1)), None),
], ids=["diag", "full", "causal-all-visible", "causal-partial", "window", "docs", "dlse"])
def test_fast_path_selection(kw, expected):
    q, k = _t(1, 64, 4, 64), _t(1, 64, 2, 64)
    assert fast_mode(q, k, cpu=True, **kw) is expected
    assert fast_mode(q, k, cpu=False, **kw) is None  # CPU tensors without the CPU opt-in: never
    assert fast_mode(q.half(), k.half(), cpu=True, **kw) is None  # no fp16 flash op on CPU


class _Refuse:
    """A fallback that fails: proves the fast path served the call."""
    name = "refuse"

    def fwd(self, *a, **k):
        raise AssertionError("fallback used for a covered call")

    bwd = fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,sq,sk", [(True, 77, 77), (False, 50, 90)], ids=["diag-causal", "full"])
def test_fast_path_matches_fp64(causal, sq, sk, dtype):
    q, k, v, dout = _t(2, sq, 4, 64, dtype), _t(2, sk, 2, 64, dtype), _t(2, sk, 2, 64, dtype), _t(2, sq, 4, 64, dtype)
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref, causal=causal)
    o_ref.backward(dout.double())
    kern = sdpa_softmax_kernel(fast_cpu=True, fallback=_Refuse())
    out, lse = kern.fwd(q, k, v, causal=causal)
    dq, dk, dv = kern.bwd(dout, q, k, v, out, lse, causal=causal)
    assert out.shape == q.shape and lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    assert_close("out", o_ref, out, dtype)
    assert_close("lse", l_ref, lse, dtype)
    for name, r, g in zip(("dq", "dk", "dv"), ref, (dq, dk, dv)):
        assert g.dtype == dtype
        assert_close(name, r.grad, g, dtype)


def test_backward_with_merged_out_lse_gives_each_block_its_share():
    """Ring attention hands bwd the merged out/lse of all key blocks: per-block grads must sum up."""
    q, k, v, dout = _t(1, 40, 2, 32), _t(1, 100, 2, 32), _t(1, 100, 2, 32), _t(1, 40, 2, 32)
    kern = sdpa_softmax_kernel(fast_cpu=True, fallback=_Refuse())
    blocks = [(0, 37), (37, 100)]
    parts = [kern.fwd(q, k[:, a:b], v[:, a:b], causal=False) for a, b in blocks]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(lb - lse).transpose(1, 2).unsqueeze(-1) * ob for ob, lb in parts)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for a, b in blocks:
        gq, gk, gv = kern.bwd(dout, q, k[:, a:b], v[:, a:b], out, lse, causal=False)
        dq += gq
        dk[:, a:b], dv[:, a:b] = gk, gv
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref)
    o_ref.backward(dout.double())
    assert_close("merged out", o_ref, out, torch.float32)
    assert_close("merged lse", l_ref, lse, torch.float32)
    for name, r, g in zip(("dq", "dk", "dv"), ref, (dq, dk, dv)):
        assert_close(name, r.grad, g, torch.float32)


def test_uncovered_calls_go_to_the_fallback():
    q, k, v, dout = _t(1, 30, 2, 32), _t(1, 60, 1, 32), _t(1, 60, 1, 32), _t(1, 30, 2, 32)
    kw = dict(causal=True, q_offset=40, k_offset=20)  # partially visible keys
    fast = sdpa_softmax_kernel(fast_cpu=True, fallback=softmax_kernel("torch"))
    plain = softmax_kernel("torch")
    out, lse = fast.fwd(q, k, v, **kw)
    o2, l2 = plain.fwd(q, k, v, **kw)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    dlse = torch.randn_like(lse)  # a gradient into the LSE is also the fallback's
    diag = dict(causal=True, q_offset=0, k_offset=0)
    qs = q[:, :30]
    ks, vs = k[:, :30], v[:, :30]
    o3, l3 = fast.fwd(qs, ks, vs, **diag)
    g_fast = fast.bwd(dout, qs, ks, vs, o3, l3, dlse=dlse, **diag)
    g_plain = plain.bwd(dout, qs, ks, vs, o3, l3, dlse=dlse, **diag)
    for a, b in zip(g_fast, g_plain):
        assert torch.equal(a, b)
    assert isinstance(fast, SoftmaxKernel)
