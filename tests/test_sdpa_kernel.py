"""The torch-SDPA-backed softmax kernel (``kernels/flash_attn/sdpa_kernel.py``) on CPU.

torch's CUDA flash ops cannot run here. Two stand-ins:
* the CPU flash op (``fast_cpu=True``: full and diagonal blocks without documents): selection, layout
  and LSE conventions, GQA, the merged-LSE backward that ring attention relies on, the fallback;
* an fp64 emulation of the CUDA varlen ops' documented rule (``fast_cpu="varlen"``, ``_op`` patched):
  bottom-right causal/window alignment per segment, +inf LSE and zero output for rows without keys.
  Through it the whole CUDA code path runs on CPU: document/window segments (checked mask by mask
  against the interval form of ``masks.py``), packing, the LSE mapping, trailing keys, merged LSE.
That torch's CUDA ops follow the rule is checked on a GPU (``tests/test_gpu_check.py``).
"""
from __future__ import annotations

import pytest
import torch

from dist_attn.kernels.flash_attn import sdpa_kernel, softmax_kernel
from dist_attn.kernels.flash_attn.masks import row_intervals
from dist_attn.kernels.flash_attn.naive import attention_ref
from dist_attn.kernels.flash_attn.sdpa_kernel import FastPlan, cum_seqs, fast_mode, sdpa_softmax_kernel
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
    plan = fast_mode(q, k, cpu=True, **kw)
    assert (None if plan is None else plan.is_causal) is expected
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


# --- the varlen (CUDA) path on CPU through an emulation of the ops' documented rule ----------------
def _fa_visible(cu_q, cu_k, max_q, max_k, is_causal, wl=None, wr=None):
    """[total_q, total_k] bool: FlashAttention-2's varlen rule. Segment b holds rows [cu_q[b], cu_q[b+1])
    and keys [cu_k[b], cu_k[b+1]); local row i sees local key j iff j <= i + lk - lq + wr and
    j >= i + lk - lq - wl (bottom-right aligned; is_causal sets wr = 0; a window >= max_k is none)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert len(cq) == len(ck) and cq[0] == ck[0] == 0
    wl = -1 if wl is None or wl >= max_k else wl
    wr = 0 if is_causal else (-1 if wr is None or wr >= max_k else wr)
    vis = torch.zeros(cq[-1], ck[-1], dtype=torch.bool)
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert lq >= 0 and lk >= 0 and lq <= max_q and lk <= max_k, "segments must fit max_seqlen"
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        ok = torch.ones(lq, lk, dtype=torch.bool)
        if wr >= 0:
            ok &= j <= i + lk - lq + wr
        if wl >= 0:
            ok &= j >= i + lk - lq - wl
        vis[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = ok
    return vis


def _emulated_op(name):
    """fp64 stand-ins of aten._flash_attention_forward/_backward (varlen form) on CPU tensors."""
    def scores(q, k, cu_q, cu_k, max_q, max_k, is_causal, scale, wl, wr):
        assert cu_q.dtype == cu_k.dtype == torch.int32 and q.is_contiguous() and k.is_contiguous()
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, 1)) * scale
        return s.masked_fill(~_fa_visible(cu_q, cu_k, max_q, max_k, is_causal, wl, wr), float("-inf")), g

    def fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout, is_causal, debug, *, scale=None, window_size_left=None,
            window_size_right=None):
        assert dropout == 0.0
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s, g = scores(q, k, cu_q, cu_k, max_q, max_k, is_causal, scale, window_size_left, window_size_right)
        lse = torch.logsumexp(s, -1)
        lse = lse.masked_fill(torch.isinf(lse), float("inf"))  # FlashAttention's lse of a row without keys
        p = torch.exp(s - lse[..., None])
        out = torch.einsum("hqk,khd->qhd", p, v.double().repeat_interleave(g, 1))
        return out.to(q.dtype), lse.float(), None, None, None

    def bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, is_causal, rng, unused, *, scale=None,
            window_size_left=None, window_size_right=None):
        assert not (lse == float("-inf")).any(), "-inf lse reaches the op: FlashAttention would give NaN"
        s, g = scores(q, k, cu_q, cu_k, max_q, max_k, is_causal, scale, window_size_left, window_size_right)
        p = torch.exp(s - lse.double()[..., None])                       # [H, q, k]
        do, o = dout.double(), out.double()
        vr, kr = v.double().repeat_interleave(g, 1), k.double().repeat_interleave(g, 1)
        delta = (do * o).sum(-1).transpose(0, 1)                         # [H, q]
        dp = torch.einsum("qhd,khd->hqk", do, vr)
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("hqk,khd->qhd", ds, kr) * scale
        dk = (torch.einsum("hqk,qhd->khd", ds, q.double()) * scale).unflatten(1, (k.shape[1], g)).sum(2)
        dv = torch.einsum("hqk,qhd->khd", p, do).unflatten(1, (k.shape[1], g)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return {"_flash_attention_forward": fwd, "_flash_attention_backward": bwd}.get(name)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(sdpa_kernel, "_op", _emulated_op)
    monkeypatch.setattr(sdpa_kernel, "_LSE_2D", {})


BF = torch.bfloat16
VARLEN_SELECT = [  # (id, kwargs, sq, sk, expected plan or None)
    ("docs-diag", dict(causal=True, cu_seqlens=torch.tensor([0, 5, 64])), 64, 64, FastPlan(True, None, True, 64)),
    ("window-diag", dict(causal=True, window_size=8), 64, 64, FastPlan(True, 8, True, 64)),
    ("docs-allgather-chunk", dict(causal=True, q_offset=100, cu_seqlens=torch.tensor([0, 120, 300])), 64, 300,
     FastPlan(True, None, True, 164)),
    ("docs-all-visible", dict(causal=True, q_offset=200, cu_seqlens=torch.tensor([0, 120, 300])), 64, 100,
     FastPlan(False, None, True, 100)),
    ("window-all-visible", dict(causal=True, q_offset=200, window_size=50), 64, 100, None),
    ("docs-partial", dict(causal=True, q_offset=100, k_offset=50, cu_seqlens=torch.tensor([0, 120, 300])), 64, 64,
     None),
    ("docs-full-offsets", dict(causal=False, q_offset=9, k_offset=200, cu_seqlens=torch.tensor([0, 120, 300])), 64,
     64, FastPlan(False, None, True, 64)),
    ("causal-bottom-right", dict(causal=True, q_offset=36), 64, 100, FastPlan(True, None, False, 100)),
    ("causal-trailing-keys", dict(causal=True, q_offset=0, k_offset=20), 63, 200, FastPlan(True, None, True, 43)),
]


@pytest.mark.parametrize("case", VARLEN_SELECT, ids=lambda c: c[0])
def test_varlen_selection(case):
    _, kw, sq, sk, expected = case
    q, k = _t(1, sq, 4, 64, BF), _t(1, sk, 2, 64, BF)
    assert fast_mode(q, k, cpu="varlen", **{"q_offset": 0, "k_offset": 0, **kw}) == expected
    assert fast_mode(q.float(), k.float(), cpu="varlen", **{"q_offset": 0, "k_offset": 0, **kw}) is None  # fp32


def test_segments_match_interval_masks():
    """Every covered call on random documents, offsets, windows: the segments under the bottom-right
    rule give exactly the visibility of masks.row_intervals (block-diagonal over the batch)."""
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for trial in range(300):
        total = int(torch.randint(8, 120, (1,), generator=gen))
        cuts = sorted(set(torch.randint(0, total + 1, (int(torch.randint(0, 6, (1,), generator=gen)),),
                                        generator=gen).tolist()) | {0, total})
        cu = torch.tensor(cuts + ([total] if trial % 7 == 0 else []))  # sometimes an empty last document
        sq, sk = (int(torch.randint(1, total + 1, (1,), generator=gen)) for _ in range(2))
        qo, ko = int(torch.randint(0, total - sq + 1, (1,), generator=gen)), int(torch.randint(0, total - sk + 1, (1,),
                                                                                                 generator=gen))
        causal = trial % 4 != 0
        window = int(torch.randint(0, 30, (1,), generator=gen)) if causal and trial % 3 == 0 else None
        docs = cu if trial % 5 != 1 else None
        q, k = torch.empty(2, sq, 2, 16, dtype=BF), torch.empty(2, sk, 1, 16, dtype=BF)
        plan = fast_mode(q, k, causal=causal, q_offset=qo, k_offset=ko, cu_seqlens=docs, window_size=window,
                         cpu="varlen")
        if plan is None:
            continue
        covered += 1
        cu_q, cu_k = cum_seqs(plan, 2, sq, sk, qo, ko, docs, torch.device("cpu"))
        got = _fa_visible(cu_q, cu_k, sq, sk, plan.is_causal, plan.window, 0 if plan.window is not None else None)
        lo, hi = row_intervals(sq, sk, qo, ko, causal, docs, window)
        j = torch.arange(sk)[None, :]
        one = (j >= lo[:, None].long()) & (j < hi[:, None].long())
        want = torch.block_diag(one, one)
        assert torch.equal(got, want), (cuts, sq, sk, qo, ko, causal, window, docs is None, plan)
    assert covered > 100


VARLEN_CASES = [  # (id, sq, sk, hq, hkv, kwargs)
    ("docs-diag-gqa", 77, 77, 4, 2, dict(causal=True, cu_seqlens=torch.tensor([0, 1, 30, 30, 64, 77]))),
    ("docs-window-diag", 70, 70, 2, 2, dict(causal=True, cu_seqlens=torch.tensor([0, 40, 70]), window_size=9)),
    ("docs-allgather-chunk", 30, 120, 2, 1, dict(causal=True, q_offset=45, cu_seqlens=torch.tensor([0, 20, 50, 120]))),
    ("docs-full-offsets-empty-rows", 40, 30, 2, 1, dict(causal=False, q_offset=0, k_offset=60,
                                                         cu_seqlens=torch.tensor([0, 25, 70, 100]))),
    ("causal-trailing-empty-rows", 33, 90, 2, 2, dict(causal=True, q_offset=0, k_offset=10)),
    ("window-only-bottom-right", 50, 80, 2, 1, dict(causal=True, q_offset=30, k_offset=0, window_size=20)),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c[0])
def test_varlen_path_matches_fp64(case, emulated):
    _, sq, sk, hq, hkv, kw = case
    kw = {"q_offset": 0, "k_offset": 0, **kw}
    q, dout = _t(2, sq, hq, 32, BF), _t(2, sq, hq, 32, BF)
    k, v = _t(2, sk, hkv, 32, BF), _t(2, sk, hkv, 32, BF)
    kern = sdpa_softmax_kernel(fast_cpu="varlen", fallback=_Refuse())
    out, lse = kern.fwd(q, k, v, **kw)
    dq, dk, dv = kern.bwd(dout, q, k, v, out, lse, **kw)
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref, **kw)
    o_ref.backward(dout.double())
    assert lse.dtype == torch.float32 and lse.shape == (2, hq, sq)
    assert_close("out", o_ref, out, BF)
    assert_close("lse", l_ref, lse, BF)  # -inf rows must match exactly
    for name, r, g in zip(("dq", "dk", "dv"), ref, (dq, dk, dv)):
        assert g.dtype == BF and torch.isfinite(g).all()
        assert_close(name, r.grad, g, BF)


def test_varlen_merged_lse_backward_with_documents(emulated):
    """Ring-style: the query block's keys split into an all-visible block and the diagonal block,
    both on the fast path with documents; per-block grads from the merged out/lse sum to the truth."""
    cu = torch.tensor([0, 60, 130, 200])
    q, dout = _t(1, 50, 2, 32, BF), _t(1, 50, 2, 32, BF)
    k, v = _t(1, 150, 2, 32, BF), _t(1, 150, 2, 32, BF)
    kern = sdpa_softmax_kernel(fast_cpu="varlen", fallback=_Refuse())
    blocks = [(0, 100), (100, 150)]  # queries at [100, 150): keys before them, then the diagonal
    kws = [dict(causal=True, q_offset=100, k_offset=a, cu_seqlens=cu) for a, _ in blocks]
    parts = [kern.fwd(q, k[:, a:b], v[:, a:b], **kw) for (a, b), kw in zip(blocks, kws)]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(torch.exp(lb - lse).transpose(1, 2).unsqueeze(-1) * ob.float() for ob, lb in parts).to(BF)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for (a, b), kw in zip(blocks, kws):
        gq, gk, gv = kern.bwd(dout, q, k[:, a:b], v[:, a:b], out, lse, **kw)
        dq += gq.float()
        dk[:, a:b], dv[:, a:b] = gk.float(), gv.float()
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref(*ref, causal=True, q_offset=100, k_offset=0, cu_seqlens=cu)
    o_ref.backward(dout.double())
    assert_close("merged out", o_ref, out, BF)
    assert_close("merged lse", l_ref, lse, BF)
    for name, r, g in zip(("dq", "dk", "dv"), ref, (dq, dk, dv)):
        assert_close(name, r.grad, g, BF)


# --- auto: per-case choice from a measured table ------------------------------------------------------
def test_auto_on_cpu_is_the_torch_backend_bit_for_bit():
    q, k, v, dout = _t(1, 40, 2, 32), _t(1, 40, 1, 32), _t(1, 40, 1, 32), _t(1, 40, 2, 32)
    kw = dict(causal=True, q_offset=0, k_offset=0, cu_seqlens=torch.tensor([0, 17, 40]))
    auto, plain = softmax_kernel("auto"), softmax_kernel("torch")
    (o1, l1), (o2, l2) = auto.fwd(q, k, v, **kw), plain.fwd(q, k, v, **kw)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(auto.bwd(dout, q, k, v, o1, l1, **kw), plain.bwd(dout, q, k, v, o2, l2, **kw)):
        assert torch.equal(a, b)


def test_select_table_nearest_length_and_auto_choice(tmp_path, monkeypatch, emulated):
    import json
    rows = [dict(mask="causal", D=32, dtype="bfloat16", S=2048, winner="sdpa"),
            dict(mask="causal", D=32, dtype="bfloat16", S=32768, winner="ours"),
            dict(mask="docs", D=32, dtype="bfloat16", S=8192, winner="ours")]
    path = tmp_path / "sdpa_select_test.json"
    path.write_text(json.dumps({"device": "test", "rows": rows}))
    table = sdpa_kernel.SelectTable.load(path)
    assert table.prefer_sdpa("causal", 32, BF, 4096) is True      # nearer 2K than 32K in log2
    assert table.prefer_sdpa("causal", 32, BF, 16384) is False
    assert table.prefer_sdpa("causal", 64, BF, 4096) is None      # no row for D=64: the default rule
    monkeypatch.setenv("DIST_ATTN_SDPA_SELECT", str(path))
    monkeypatch.setattr(sdpa_kernel, "_TABLES", {})
    used = []

    class Record:
        name = "record"

        def fwd(self, q, k, v, **kw):
            used.append("ours")
            return softmax_kernel("torch").fwd(q, k, v, **kw)

    kern = sdpa_softmax_kernel(fast_cpu="varlen", fallback=Record(), select=sdpa_kernel.auto_select)
    q, k, v = _t(1, 48, 2, 32, BF), _t(1, 48, 1, 32, BF), _t(1, 48, 1, 32, BF)
    kern.fwd(q, k, v, causal=True)                                       # causal, S=48 -> nearest 2K: sdpa
    assert used == []
    kern.fwd(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 20, 48]))  # docs: the table says ours
    assert used == ["ours"]
    kern.fwd(q, k, v, causal=True, window_size=4)                        # window: no row, default sdpa
    assert used == ["ours"]


def test_many_documents_cut_to_the_block_or_fall_back():
    """A CPU cu_seqlens is cut to the documents meeting the block; a long device-resident one (here
    a meta tensor stands for it) would make one segment per global document: fallback."""
    q, k = _t(1, 64, 2, 32, BF), _t(1, 64, 1, 32, BF)
    cu = torch.arange(0, 4097, 4)  # 1024 documents of 4 tokens over 4096 positions
    kw = dict(causal=True, q_offset=1000, k_offset=1000, cpu="varlen")
    assert fast_mode(q, k, cu_seqlens=cu, **kw) == FastPlan(True, None, True, 64)
    cu_q, cu_k = cum_seqs(FastPlan(True, None, True, 64), 1, 64, 64, 1000, 1000, cu, torch.device("cpu"))
    assert cu_q.numel() == 64 // 4 + 2 and torch.equal(cu_q, cu_k)
    assert fast_mode(q, k, cu_seqlens=cu.to("meta"), **kw) is None
