"""The communication layer: results of each wrapped collective and the bytes it records."""
import time

import pytest
import torch
import torch.distributed as dist

from dist_attn import comm
from tests.dist import DistributedHang, run_distributed


def _collectives(rank, world_size):
    x = torch.full((3, 5), float(rank), dtype=torch.float32)  # 60 bytes
    with comm.CommRecorder() as rec:
        g = comm.all_gather(x, None)
        assert g.shape == (world_size, 3, 5)
        assert all(torch.equal(g[r], torch.full((3, 5), float(r))) for r in range(world_size))
        rs = comm.reduce_scatter(torch.ones(world_size, 4) * (rank + 1), None)
        assert torch.equal(rs, torch.full((4,), float(sum(range(1, world_size + 1)))))
        a2a = comm.all_to_all(torch.arange(world_size, dtype=torch.float32).repeat_interleave(2).view(world_size, 2)
                              + 10 * rank, None)
        # slice i of the result came from rank i, which sent its slice `rank`
        assert torch.equal(a2a[:, 0], torch.tensor([10.0 * i + rank for i in range(world_size)]))
        ring = comm.RingComm(None)
        got = ring.send_recv(torch.tensor([float(rank)]))
        ring.wait()
        assert got.item() == float((rank - 1) % world_size)
    p = world_size
    assert rec.sent["all_gather"] == (p - 1) * 60
    assert rec.sent["reduce_scatter"] == (p - 1) * 16
    assert rec.sent["all_to_all"] == (p - 1) * (p * 2 * 4) // p
    assert rec.sent["p2p"] == 4 and rec.recv["p2p"] == 4
    return rec.total_sent


@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_and_byte_counts(world_size):
    totals = run_distributed(_collectives, world_size, reuse=True)
    assert len(set(totals)) == 1


def _mismatched(rank, world_size):
    if rank == 0:
        dist.all_reduce(torch.zeros(1))  # rank 1 never joins: a hang without timeouts
    return rank


def test_harness_turns_a_hang_into_an_error():
    t0 = time.monotonic()
    with pytest.raises((DistributedHang, AssertionError)):
        run_distributed(_mismatched, 2, timeout=60, pg_timeout=5)
    assert time.monotonic() - t0 < 60
