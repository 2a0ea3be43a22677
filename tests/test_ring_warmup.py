"""The ring's one-time point-to-point warm-up (``dist_attn.ring.warm_up_p2p``).

NCCL requires the first point-to-point call of a group to involve every rank; a planned ring with
documents or a window skips some ranks' calls. At P=3 (contiguous, S=24, 8 tokens per rank):

* documents [0, 8, 16, 24) end on the rank boundaries: no rank needs another's block, so the plan
  exchanges nothing, yet the first call of the group runs the full-ring warm-up (every rank);
* documents [0, 5, 20, 24): only rank 1 needs rank 0's block and rank 2 rank 1's (d = 1 only): a plan
  in which rank 2 sends nothing and rank 0 receives nothing.

Outputs and gradients (fp32) match the fp64 masked reference; the recorded p2p bytes are exactly the plan's
(:func:`dist_attn.documents.doc_cost`): the warm-up's 4 bytes are not counted. The warm-up runs once per
group (a second group warms up on its own first call).
"""
from __future__ import annotations

import torch

from tests.dist import run_distributed
from tests.utils import assert_close

S, P, B, HQ, HKV, D = 24, 3, 2, 4, 2, 8
CASES = [(0, 8, 16, 24), (0, 5, 20, 24)]


def _worker(rank, world):
    import torch.distributed as dist
    from dist_attn.comm import CommRecorder
    from dist_attn.documents import doc_cost
    from dist_attn.kernels.flash_attn.naive import attention_ref
    from dist_attn.layout import shard
    from dist_attn.ring import _WARM_GROUPS, ring_attention, warm_up_p2p
    out = {"warm_before": dist.group.WORLD in _WARM_GROUPS}
    for i, offsets in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (HQ, HKV, HKV))  # fp32, reference in fp64
        dout = torch.randn(B, S, HQ, D, generator=g)
        cu = torch.tensor(offsets, dtype=torch.int32)
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        o_ref, _ = attention_ref(*ref, causal=True, cu_seqlens=cu)
        o_ref.backward(dout.double())
        loc = [shard(t, rank, world, "contiguous", dim=1).clone().requires_grad_() for t in (q, k, v)]
        with CommRecorder() as rec:
            o = ring_attention(*loc, group=None, causal=True, layout="contiguous", cu_seqlens=cu)
            fwd_sent = rec.total_sent
            o.backward(shard(dout, rank, world, "contiguous", dim=1))
        assert_close("out", shard(o_ref, rank, world, "contiguous", dim=1), o)
        for name, r, t in zip("qkv", ref, loc):
            assert_close(f"d{name}", shard(r.grad, rank, world, "contiguous", dim=1), t.grad)
        block = 2 * B * (S // P) * HKV * D * 4  # K and V of one rank, fp32
        out[f"fwd_sent_{i}"] = fwd_sent
        out[f"plan_fwd_{i}"] = doc_cost(cu, None, world, "contiguous", block_bytes=block)["ring_bytes_fwd"][rank]
    out["warm_after"] = dist.group.WORLD in _WARM_GROUPS
    out["again"] = warm_up_p2p(None, torch.device("cpu"))          # already warm: nothing runs
    sub = dist.new_group(list(range(world)))
    out["new_group"] = warm_up_p2p(sub, torch.device("cpu"))       # a new group warms up on its own
    return out


def test_skipping_plans_warm_the_group_and_count_only_planned_bytes():
    for rank, res in enumerate(run_distributed(_worker, P, timeout=180, reuse=True)):
        assert not res["warm_before"] and res["warm_after"]
        assert not res["again"] and res["new_group"]
        assert res["fwd_sent_0"] == res["plan_fwd_0"] == 0  # nothing crosses a rank boundary
        assert res["fwd_sent_1"] == res["plan_fwd_1"]       # exactly the planned blocks, no warm-up bytes
    from dist_attn.documents import doc_cost  # case 2 really skips: rank 2 sends nothing
    assert [b > 0 for b in doc_cost(CASES[1], None, P, "contiguous", block_bytes=1)["ring_bytes_fwd"]] == \
        [True, True, False]
