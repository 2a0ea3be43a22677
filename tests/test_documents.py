"""Packed documents (``cu_seqlens``) and sliding windows for the softmax CP strategies.

One gloo launch of 4 processes (sub-groups of 2 and 3 ranks for P = 2, 3; spawning dominates on
CPU) runs every strategy (ring, all-gather, Ulysses, USP) on
a batch of cases: outputs and dq/dk/dv of every rank vs the fp64 single-process reference with the
document-block-diagonal (and windowed) mask built from the definition (``naive.document_mask``),
both layouts, fp32 and bf16, MHA/GQA/MQA. The documents include one of a single token, one ending
on a chunk boundary, one shorter than a chunk, one spanning several ranks and an empty one. The ring's
bytes are checked exactly against a brute-force count of which rank needs which rank's block (dense
mask), and a short window must move only neighbouring blocks. Bad ``cu_seqlens`` / ``window_size``
raise ``ValueError`` on every rank before any collective. Host helpers of ``dist_attn.documents`` are
checked against brute force without processes.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from dist_attn.documents import doc_cost, key_range, ring_need, visible_pairs
from dist_attn.kernels.flash_attn.naive import document_mask
from dist_attn.layout import position_ids, rank_ranges
from tests.dist import run_distributed

C = 5  # tokens per zigzag chunk: S = 2P·C


def documents(p: int) -> list:
    """Offsets over S = 2P·C: a 1-token doc, a doc ending on the chunk boundary C, an empty doc, a doc
    shorter than a chunk, one spanning chunks (and ranks), and the rest."""
    return [0, 1, C, C, C + 2, 3 * C + 1, 2 * p * C]


def cases(p: int) -> list:
    """(strategy, layout, dtype, Hq, Hkv, with documents, window)."""
    hq = {2: 4, 3: 6, 4: 4}[p]
    grid = [("zigzag", torch.float32, hq, 2 if p != 3 else 3, True, None),
            ("contiguous", torch.bfloat16, hq, hq, True, 3),
            ("zigzag", torch.bfloat16, hq, 1, False, 2),
            ("contiguous", torch.float32, hq, 2 if p != 3 else 3, True, 2 * C + 1),
            ("zigzag", torch.float32, hq, hq, True, 0)]
    strategies = ["ring", "allgather", "ulysses"] + (["usp"] if p in (2, 4) else [])
    return [(s,) + g for s in strategies for g in grid]


def reference(q, k, v, dout, cu, window):
    from dist_attn.kernels.flash_attn.naive import attention_ref
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out, _ = attention_ref(*leaves, causal=True, cu_seqlens=cu, window_size=window)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def brute_need(n, p, layout, cu, window):
    """need[r][src] from the dense mask: does any query of rank r see a key of rank src."""
    vis = document_mask(n, n, 0, 0, True, cu, window)
    pos = [position_ids(n, r, p, layout) for r in range(p)]
    return [[bool(vis[pos[r]][:, pos[s]].any()) for s in range(p)] for r in range(p)]


def _correctness(rank, p, group, usp_groups):
    import torch.distributed as dist
    from dist_attn import allgather_attention, ring_attention, ulysses_attention, usp_attention
    from dist_attn.comm import CommRecorder
    from dist_attn.layout import shard
    from tests.utils import assert_close

    failures, n = [], 2 * p * C
    for i, (strategy, layout, dtype, hq, hkv, docs, window) in enumerate(cases(p)):
        b, d = (2, 16) if i % 2 else (1, 24)
        cu = torch.tensor(documents(p), dtype=torch.int32 if i % 2 else torch.int64) if docs else None
        tag = f"{strategy} P={p} {layout} {dtype} Hq={hq} Hkv={hkv} docs={docs} window={window} B={b}"
        g = torch.Generator().manual_seed(i)
        q, k, v, dout = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype)
                         for h in (hq, hkv, hkv, hq))
        refs = reference(q, k, v, dout, cu, window)
        kw = dict(causal=True, layout=layout, cu_seqlens=cu, window_size=window)
        if strategy == "usp":
            fn = functools.partial(usp_attention, ulysses_group=usp_groups[0], ring_group=usp_groups[1], **kw)
        else:
            fn = functools.partial({"ring": ring_attention, "allgather": allgather_attention,
                                    "ulysses": ulysses_attention}[strategy], group=group, **kw)
        loc = [shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v)]
        with CommRecorder() as rec_f:
            out = fn(*loc)
        with CommRecorder() as rec_b:
            out.backward(shard(dout, rank, p, layout))
        for name, ref, got in zip(("out", "dq", "dk", "dv"), refs, [out] + [t.grad for t in loc]):
            try:
                assert_close(f"{tag} rank {rank} {name}", shard(ref, rank, p, layout), got, dtype=dtype)
            except AssertionError as e:
                failures.append(str(e))
        if strategy == "ring":  # exact bytes: K/V blocks only where needed, dK/dV back the same way
            need = brute_need(n, p, layout, cu, window)
            sends = sum(need[dst][rank] for dst in range(p) if dst != rank)
            recvs = sum(need[rank][src] for src in range(p) if src != rank)
            block = b * (n // p) * hkv * d
            want_f = 2 * sends * block * q.element_size()
            want_b = want_f + 2 * recvs * block * 4
            got = (rec_f.sent.get("p2p", 0), rec_b.sent.get("p2p", 0), rec_f.total_sent, rec_b.total_sent)
            if got != (want_f, want_b, want_f, want_b):
                failures.append(f"{tag} rank {rank} bytes: sent {got}, expected fwd {want_f} bwd {want_b}")
    return failures, len(cases(p))


def _ulysses_linear(rank, p, group):
    """Ulysses with a LinearKernel: cu_seqlens (global = local after the all-to-all) and a per-token gate g
    sharded like q, vs the fp64 step-by-step recurrence with resets; gradients include dg."""
    from dist_attn import ulysses_attention
    from dist_attn.kernels.lightning_attn import linear_kernel
    from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
    from dist_attn.layout import shard
    from tests.utils import assert_close
    failures, n, h = [], 2 * p * C, 2 * p
    for i, (layout, dtype) in enumerate((("zigzag", torch.float32), ("contiguous", torch.bfloat16))):
        gen = torch.Generator().manual_seed(50 + i)
        q, k, v, dout = (torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
        gate = -torch.rand(2, n, h, generator=gen, dtype=torch.float64).float()  # fp32 gate: its own all-to-all
        cu = torch.tensor(documents(p), dtype=torch.int32)
        decay = -torch.linspace(0.05, 0.5, h)
        leaves = [t.double().requires_grad_(True) for t in (q, k, v, gate)]
        ref, _ = linear_attn_recurrent(*leaves[:3], decay=decay.double(), g=leaves[3], cu_seqlens=cu)
        ref.backward(dout.double())
        loc = [shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v, gate)]
        out = ulysses_attention(*loc[:3], group=group, layout=layout, local_attn=linear_kernel("auto"),
                                decay=decay, cu_seqlens=cu, g=loc[3])
        out.backward(shard(dout, rank, p, layout))
        for name, r, got in zip(("out", "dq", "dk", "dv", "dg"), [ref.detach()] + [t.grad for t in leaves],
                                [out] + [t.grad for t in loc]):
            try:
                assert_close(f"ulysses linear P={p} {layout} {dtype} rank {rank} {name}", shard(r, rank, p, layout),
                             got, dtype=dtype)
            except AssertionError as e:
                failures.append(str(e))
    return failures


def _window_bytes(rank, p, group):
    """A window shorter than a chunk: the ring moves only neighbouring blocks (exact counts)."""
    import torch.distributed as dist
    from dist_attn import ring_attention
    from dist_attn.comm import CommRecorder
    res = {}
    for layout in ("contiguous", "zigzag"):
        n, b, h, d = 2 * p * 8, 1, 2, 16
        x = torch.randn(b, n // p, h, d)
        for window in (None, 3):
            with CommRecorder() as rec:
                ring_attention(x, x, x, group=group, causal=True, layout=layout, window_size=window)
            res[(layout, window)] = rec.sent.get("p2p", 0)
    return res


def _errors(rank, p, group, usp_groups):
    from dist_attn import allgather_attention, ring_attention, ulysses_attention, usp_attention
    ug, rg = usp_groups
    n = 2 * p * 2
    x = torch.randn(1, n // p, 2, 8)
    bad = [
        ("not at 0", dict(cu_seqlens=torch.tensor([1, 3, n])), "start at 0"),
        ("not at S", dict(cu_seqlens=torch.tensor([0, 3, n - 1])), f"end at the global sequence length S={n}"),
        ("decreasing", dict(cu_seqlens=torch.tensor([0, 5, 3, n])), "never decreasing"),
        ("float", dict(cu_seqlens=torch.tensor([0.0, 3.0, float(n)])), "int32/int64"),
        ("2-D", dict(cu_seqlens=torch.tensor([[0, n]])), "1-D"),
        ("list", dict(cu_seqlens=[0, n]), "torch tensor"),
        ("negative window", dict(window_size=-1), "int >= 0"),
        ("float window", dict(window_size=2.5), "int >= 0"),
        ("window non-causal", dict(window_size=2, causal=False), "only with causal=True"),
    ]
    fns = {"ring": functools.partial(ring_attention, group=group), "allgather": functools.partial(
        allgather_attention, group=group), "ulysses": functools.partial(ulysses_attention, group=group),
        "usp": functools.partial(usp_attention, ulysses_group=ug, ring_group=rg)}
    got = []
    for (sname, fn), (label, kw, frag) in itertools.product(fns.items(), bad):
        kw = dict(dict(causal=True), **kw)
        try:
            fn(x, x, x, **kw)
            got.append(f"{sname} {label}: no error")
        except ValueError as e:
            if frag not in str(e) or "Fix:" not in str(e):
                got.append(f"{sname} {label}: message {e}")
        fn(x, x, x, causal=True, cu_seqlens=torch.tensor([0, 3, n]))  # the ranks are still aligned
    # ranks that disagree on the documents: caught in debug (anomaly) mode, on every rank together
    for sname in ("ring", "allgather", "ulysses"):
        try:
            with torch.autograd.set_detect_anomaly(True):
                fns[sname](x, x, x, causal=True, cu_seqlens=torch.tensor([0, 3 + rank, n]))
            got.append(f"{sname} different cu_seqlens: no error")
        except ValueError as e:
            if "same cu_seqlens" not in str(e):
                got.append(f"{sname} different cu_seqlens: message {e}")
    return got


def _launch_worker(rank, world):
    """Every check of every P in one job: the groups are created by all ranks in the same order, then
    each rank runs the P it belongs to (ranks outside a sub-group skip it)."""
    import torch.distributed as dist
    from dist_attn.groups import make_usp_groups
    groups = {p: (dist.new_group(list(range(p))) if p < world else dist.group.WORLD) for p in (2, 3, 4)}
    usp = {2: make_usp_groups([0, 1], 1), 4: make_usp_groups(None, 2)}
    out = {}
    for p in (2, 3, 4):
        if rank >= p:
            continue
        res = {"correct": _correctness(rank, p, groups[p], usp.get(p)), "linear": _ulysses_linear(rank, p, groups[p])}
        if p in (3, 4):
            res["window_bytes"] = _window_bytes(rank, p, groups[p])
        if p == 2:
            res["errors"] = _errors(rank, p, groups[p], usp[2])
        out[p] = res
    return out


@functools.lru_cache(maxsize=None)
def _results():
    return run_distributed(_launch_worker, 4, timeout=300, reuse=True)


def _launch(p):
    return [r[p] for r in _results()[:p]]


@pytest.mark.parametrize("p", [2, 3, 4], ids=lambda p: f"P{p}")
def test_strategies_with_documents_and_windows_match_reference(p):
    failures = [f for r in _launch(p) for f in r["correct"][0]]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:20])
    assert all(r["correct"][1] >= 15 for r in _launch(p))


@pytest.mark.parametrize("p", [2, 3, 4], ids=lambda p: f"P{p}")
def test_ulysses_linear_with_documents_and_gate_matches_recurrence(p):
    failures = [f for r in _launch(p) for f in r["linear"]]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("p", [3, 4], ids=lambda p: f"P{p}")
def test_short_window_moves_only_neighbouring_blocks(p):
    block = 2 * 1 * 16 * 2 * 16 * 4  # K and V of one rank: 2·B·(S/P)·Hkv·D·fp32
    for rank, r in enumerate(_launch(p)):
        got = r["window_bytes"]
        assert got[("contiguous", None)] == got[("zigzag", None)] == (p - 1) * block  # the plain ring
        assert got[("contiguous", 3)] == (block if rank < p - 1 else 0)  # to rank+1 only; the last sends none
        # zigzag: chunk r needs chunk r-1 (rank r-1) and chunk 2P-1-r needs 2P-2-r (rank r+1)
        assert got[("zigzag", 3)] == block * ((rank > 0) + (rank < p - 1)), (rank, got)


def test_bad_documents_and_windows_raise_on_every_rank():
    for rank, r in enumerate(_launch(2)):
        assert r["errors"] == [], f"rank {rank}: " + "\n".join(r["errors"])


# --- host helpers vs brute force (no processes) --------------------------------------------------
@pytest.mark.parametrize("causal,window", [(True, None), (True, 0), (True, 3), (True, 40), (False, None)],
                         ids=["causal", "window0", "window3", "window40", "full"])
def test_key_ranges_and_pair_counts_match_the_dense_mask(causal, window):
    cu, n = (0, 1, 7, 7, 9, 30, 48), 48
    vis = document_mask(n, n, 0, 0, causal, torch.tensor(cu), window)
    for a, b in [(0, 1), (0, 12), (5, 9), (7, 30), (29, 48), (12, 24)]:
        lo, hi = key_range(a, b, cu, causal, window, n)
        cols = vis[a:b].any(0).nonzero().flatten()
        if len(cols):
            assert (lo, hi) == (int(cols.min()), int(cols.max()) + 1)  # one contiguous range
            assert bool(vis[a:b, lo:hi].any(0).all())
        else:
            assert hi <= lo
        for kr in [(0, 12), (12, 24), (36, 48)]:
            assert visible_pairs((a, b), kr, cu, causal, window, n) == int(vis[a:b, kr[0]:kr[1]].sum())
    for p, layout in itertools.product((2, 3, 4), ("zigzag", "contiguous")):
        if n % (2 * p if layout == "zigzag" else p) == 0:
            assert ring_need(cu, causal, window, p, layout, n) == brute_need(n, p, layout, torch.tensor(cu), window) \
                if causal else True


def test_doc_cost_counts_pairs_and_ring_sends():
    cu, p = (0, 10, 14, 40, 64), 4
    vis = document_mask(64, 64, 0, 0, True, torch.tensor(cu), 6)
    for layout in ("zigzag", "contiguous"):
        cost = doc_cost(torch.tensor(cu), 6, p, layout, block_bytes=100)
        pairs = [int(vis[position_ids(64, r, p, layout)].sum()) for r in range(p)]
        assert cost["pairs"] == pairs
        assert cost["pairs_max_over_mean"] == pytest.approx(max(pairs) / (sum(pairs) / p))
        need = brute_need(64, p, layout, torch.tensor(cu), 6)
        sends = [sum(need[d][s] for d in range(p) if d != s) for s in range(p)]
        assert cost["ring_sends"] == sends and cost["ring_bytes_fwd"] == [100 * x for x in sends]
    full = doc_cost(None, None, 4, "zigzag", seq_len=64)
    assert full["ring_sends"] == [3] * 4 and full["pairs_max_over_mean"] == 1.0
    assert rank_ranges(64, 1, 4, "zigzag") == ((8, 16), (48, 56))
