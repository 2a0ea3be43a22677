"""USP (Ulysses over U x ring over R) on gloo CPU processes vs the fp64 reference, the sub-group grid,
the layout identity it rests on, the closed-form byte counts, and the error paths. One launch per P."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from dist_attn.layout import position_ids
from tests.dist import run_distributed
from tests.ulysses_runner import compare, make_tensors, run_sharded, softmax_ref, ulysses_bytes

SPLITS = {2: ((2, 1), (1, 2)), 4: ((2, 2), (1, 4), (4, 1))}
HEADS = {2: (4, (4, 2, 1)), 4: (8, (8, 4, 2, 1))}  # Hq, KV-head options (Hkv < U replicates)
CHUNK = 3  # tokens per zigzag chunk over P


@pytest.mark.parametrize("p,u", [(2, 1), (2, 2), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4)])
def test_zigzag_over_p_regroups_to_zigzag_over_r(p, u):
    # Independent of dist_attn.usp: first halves of the U gathered shards in rank order, then their
    # second halves in reverse rank order, is exactly rank j's shard of a zigzag layout over R.
    from dist_attn.usp import ring_local_order
    r, s = p // u, 2 * p * 5
    for j in range(r):
        shards = [position_ids(s, j * u + i, p, "zigzag") for i in range(u)]
        halves = [t.chunk(2) for t in shards]
        regrouped = torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)])
        assert torch.equal(regrouped, position_ids(s, j, r, "zigzag"))
        contiguous = torch.cat([position_ids(s, j * u + i, p, "contiguous") for i in range(u)])
        assert torch.equal(contiguous, position_ids(s, j, r, "contiguous"))
        order = ring_local_order(s, u, r, j, "zigzag")
        if u > 1:
            assert torch.equal(torch.cat(shards)[order[0]], regrouped)
        assert ring_local_order(s, u, r, j, "contiguous") is None


def _groups(rank, p):
    """Create every split's groups (same order on every rank) and report their ranks."""
    import torch.distributed as dist
    from dist_attn.groups import make_usp_groups
    made, seen = {}, {}
    for u, r in SPLITS[p]:
        ug, rg = make_usp_groups(None, u)
        made[(u, r)] = (ug, rg)
        seen[(u, r)] = (dist.get_process_group_ranks(ug), dist.get_process_group_ranks(rg),
                        dist.get_rank(ug), dist.get_rank(rg))
    return made, seen


def _correctness(rank, p, made):
    from dist_attn.usp import usp_attention
    failures, n_checked = [], 0
    hq, hkv_opts = HEADS[p]
    n = 2 * p * CHUNK
    cases = itertools.product(SPLITS[p], ("zigzag", "contiguous"), (True, False))
    for i, ((u, r), layout, causal) in enumerate(cases):
        hkv = hkv_opts[i % len(hkv_opts)]
        dtype = torch.bfloat16 if i % 3 == 2 else torch.float32
        b, d = (2, 64) if i % 2 else (1, 96)
        tag = f"usp P={p} U={u} R={r} Hq={hq} Hkv={hkv} {layout} causal={causal} {dtype} B={b} D={d}"
        q, k, v, dout = make_tensors(300 + i, [(b, n, hq, d), (b, n, hkv, d), (b, n, hkv, d), (b, n, hq, d)], dtype)
        refs = softmax_ref(q, k, v, dout, causal)
        ug, rg = made[(u, r)]
        *outs, rec_f, rec_b = run_sharded(usp_attention, (q, k, v), dout, rank, p, layout, ulysses_group=ug,
                                          ring_group=rg, causal=causal)
        compare(failures, tag, ("out", "dq", "dk", "dv"), refs, outs, rank, p, layout, dtype)
        # closed forms: Ulysses over U on the local tokens, ring over R with Hkv'/U heads of N/R tokens
        elem, hkv_r = q.element_size(), max(hkv, u) // u
        a2a = ulysses_bytes(u, b, n // r, hq, hkv, d, d, elem)
        ring_f = 2 * (r - 1) * b * (n // r) * hkv_r * d * elem
        ring_b = 2 * (r - 1) * b * (n // r) * hkv_r * d * (elem + 4)
        for direction, rec, ring in (("forward", rec_f, ring_f), ("backward", rec_b, ring_b)):
            got = (rec.sent.get("all_to_all", 0), rec.sent.get("p2p", 0), rec.total_sent)
            if got != (a2a, ring, a2a + ring):
                failures.append(f"{tag} {direction}: sent {dict(rec.sent)}, expected all_to_all {a2a}, p2p {ring}")
        n_checked += 1
    return failures, n_checked


def _errors(rank, p, made):
    """Each bad input on every rank -> ValueError, and the ranks stay aligned afterwards."""
    import torch.distributed as dist
    from dist_attn.groups import make_usp_groups
    from dist_attn.usp import usp_attention
    from dist_attn.kernels.lightning_attn import linear_kernel
    ug, rg = made[(2, 2)]
    good = dict(q=torch.zeros(1, 4, 8, 32), k=torch.zeros(1, 4, 8, 32), v=torch.zeros(1, 4, 8, 32),
                ulysses_group=ug, ring_group=rg)
    cases = [
        ("U not dividing P", lambda: make_usp_groups(None, 3), "positive divisor of the CP size P=4"),
        ("U = 0", lambda: make_usp_groups(None, 0), "positive divisor"),
        ("bad rank list", lambda: make_usp_groups([0, 0, 1], 1), "distinct global ranks"),
        ("Hq % U", lambda: usp_attention(**{**good, **{t: torch.zeros(1, 4, 3, 32) for t in "qkv"}}), "Hq=3"),
        ("U % Hkv", lambda: usp_attention(**{**good, "q": torch.zeros(1, 4, 6, 32), "k": torch.zeros(1, 4, 3, 32),
                                            "v": torch.zeros(1, 4, 3, 32)}), "Hkv=3"),
        ("zigzag length", lambda: usp_attention(**{**good, **{t: torch.zeros(1, 3, 8, 32) for t in "qkv"}}),
         "divisible by"),
        ("layout", lambda: usp_attention(**good, layout="stripe"), "expected one of"),
        ("no ring group", lambda: usp_attention(**{**good, "ring_group": None}), "ring_group"),
        ("same group twice", lambda: usp_attention(**{**good, "ring_group": ug}), "U x R grid"),
        ("linear kernel", lambda: usp_attention(**good, local_attn=linear_kernel("auto")), "SoftmaxKernel"),
        ("dtype", lambda: usp_attention(**{**good, "k": torch.zeros(1, 4, 8, 32, dtype=torch.float64)}), "one dtype"),
    ]
    got = []
    for name, call, frag in cases:
        try:
            call()
            got.append((name, "no error", "", frag))
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            got.append((name, type(e).__name__, str(e), frag))
    # still aligned: a group created after the refusals works, and so does a valid call
    g = dist.new_group(ranks=list(range(p)))
    t = torch.ones(1)
    dist.all_reduce(t, group=g)
    out = usp_attention(**good)
    return got, t.item() == p and bool(torch.isfinite(out).all())


def _launch_worker(rank, p):
    made, seen = _groups(rank, p)
    out = {"groups": seen, "reference": _correctness(rank, p, made)}
    if p == 4:
        out["errors"] = _errors(rank, p, made)
    return out


@functools.lru_cache(maxsize=None)
def _launch(p):
    return run_distributed(_launch_worker, p, timeout=300, reuse=True)


@pytest.mark.parametrize("p", [2, 4], ids=lambda p: f"P{p}")
def test_usp_groups_grid(p):
    for rank, res in enumerate(_launch(p)):
        for (u, r), (u_ranks, r_ranks, u_idx, r_idx) in res["groups"].items():
            j = rank // u
            assert u_ranks == [j * u + i for i in range(u)], (u, r, rank, u_ranks)
            assert r_ranks == [jj * u + rank % u for jj in range(r)], (u, r, rank, r_ranks)
            assert (u_idx, r_idx) == (rank % u, j)


@pytest.mark.parametrize("p", [2, 4], ids=lambda p: f"P{p}")
def test_usp_matches_reference(p):
    results = [res["reference"] for res in _launch(p)]
    failures = [f for fails, _ in results for f in fails]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:30])
    assert all(n == 4 * len(SPLITS[p]) for _, n in results)


def test_usp_errors_raise_on_every_rank():
    for rank, res in enumerate(_launch(4)):
        got, aligned = res["errors"]
        assert aligned, f"rank {rank}: collectives misaligned after the refused calls"
        for name, typ, msg, frag in got:
            assert typ == "ValueError", f"rank {rank} {name}: raised {typ}: {msg}"
            assert frag in msg and "Fix:" in msg, f"rank {rank} {name}: message lacks {frag!r}: {msg}"
