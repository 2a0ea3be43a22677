"""All-gather attention on gloo CPU processes against the single-process fp64 reference.

Same batches of cases as ``tests/test_ring.py`` (output and dq/dk/dv, fp32 and bf16, causal and
full, MHA/GQA/MQA, B > 1, D in {64, 96}, both layouts, long local chunks, exact byte counts of the
all-gather and the reduce-scatter), the error paths, and the helpers that reorder the gathered
K/V between rank order and global order.
"""
from __future__ import annotations

import pytest
import torch

from dist_attn.allgather import _from_sequence, _gathered_index, _remote_blocks, _to_sequence
from dist_attn.layout import position_ids, shard
from tests.dist import run_distributed
from tests.softmax_cp_runner import cases_for, cases_worker, check_errors


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda p: f"P{p}")
def test_allgather_matches_reference(world):
    cases = cases_for(world, "allgather")
    res = run_distributed(cases_worker, world, "allgather", cases, world == 2, timeout=240, reuse=True)
    assert all(set(r) == {c[0] for c in cases} for r in res)


def test_allgather_errors_on_every_rank():
    check_errors("allgather")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequence_reorder_roundtrip(layout, world):
    # the gathered [P, 2, B, S/P, H, D] (rank order) -> [2, B, S, H, D] in global order and back
    s_local, b, h, d = 6, 2, 3, 4
    x = torch.randn(2, b, world * s_local, h, d)
    gathered = torch.stack([shard(x, r, world, layout, dim=2) for r in range(world)])
    idx = _gathered_index(world, s_local, layout, causal=True, device=None)
    seq = _to_sequence(gathered, idx)
    assert torch.equal(seq, x)
    assert torch.equal(_from_sequence(seq, idx, world), gathered)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_remote_blocks_cover_the_visible_keys_once(layout, causal, world):
    # local block (causal on the local concatenation) + remote blocks must visit every visible
    # (query, key) pair exactly once, and no invisible pair; zigzag causal: equal work on every rank
    s_local = 8
    n = world * s_local
    work = []
    for rank in range(world):
        qpos = position_ids(n, rank, world, layout)
        seen = torch.zeros(s_local, n, dtype=torch.int64)
        if causal:
            local = torch.tril(torch.ones(s_local, s_local, dtype=torch.int64))
        else:
            local = torch.ones(s_local, s_local, dtype=torch.int64)
        seen[:, qpos] += local
        order = torch.cat([position_ids(n, r, world, layout) for r in range(world)])
        kpos = order[_gathered_index(world, s_local, layout, causal, None)]  # key order of the blocks
        cost = int(local.sum())
        for qs, (a, b) in _remote_blocks(rank, world, layout, causal, s_local):
            rows = torch.arange(s_local)[qs]
            seen[rows[:, None], kpos[a:b][None, :]] += 1
            cost += len(rows) * (b - a)
        visible = torch.arange(n)[None, :] <= qpos[:, None] if causal else torch.ones(s_local, n, dtype=torch.bool)
        assert torch.equal(seen, visible.long()), f"rank {rank}"
        work.append(cost)
    if causal and layout == "zigzag":
        assert len(set(work)) == 1, work
