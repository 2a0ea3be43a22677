"""Communication helpers shared by the strategies, with optional byte accounting.

Every collective a strategy issues goes through this module so that :class:`CommRecorder` can count
bytes per collective kind per rank. Bytes are counted as the payload this rank *sends* (and
*receives*), with the conventions of the cost lines in the strategies' docstrings:

* P2P send/recv: the tensor's bytes.
* all-gather of a local tensor of b bytes over P ranks: sends (P-1)·b, receives (P-1)·b.
* reduce-scatter producing a local b-byte shard: sends (P-1)·b, receives (P-1)·b.
* all-to-all of a local tensor of b bytes: sends (P-1)/P·b, receives (P-1)/P·b.

The recorder is opt-in (``with CommRecorder() as rec: ...``) and costs nothing when unused.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Active recorders, innermost last. A plain process-wide list rather than a context variable: autograd
# runs backward on its own device threads on GPU, and their collectives must be counted too.
_active: list = []


@dataclass
class CommRecorder:
    """Counts bytes sent/received and calls per collective kind on this rank."""
    sent: dict = field(default_factory=lambda: defaultdict(int))
    recv: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def __enter__(self):
        _active.append(self)
        return self

    def __exit__(self, *exc):
        _active.remove(self)
        return False

    def add(self, kind: str, sent: int, recv: int) -> None:
        self.sent[kind] += int(sent)
        self.recv[kind] += int(recv)
        self.calls[kind] += 1

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_recv(self) -> int:
        return sum(self.recv.values())


def _record(kind: str, sent: float, recv: float) -> None:
    for rec in _active:
        rec.add(kind, sent, recv)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, group, async_op: bool = False):
    """``x [...]`` on each rank -> ``[P, ...]`` stacked in rank order (and the work handle if async)."""
    p = dist.get_world_size(group)
    # collectives see flat buffers: [P * numel] out, [numel] in; viewed back as [P, ...]
    flat = torch.empty(p * x.numel(), dtype=x.dtype, device=x.device)
    _record("all_gather", (p - 1) * nbytes(x), (p - 1) * nbytes(x))
    work = _all_gather_single(flat, x.contiguous().view(-1), group=group, async_op=async_op)
    out = flat.view((p,) + tuple(x.shape))
    return (out, work) if async_op else out


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """``x [P, ...]`` on each rank -> this rank's ``[...]`` slice summed over ranks."""
    p = dist.get_world_size(group)
    assert x.shape[0] == p, "reduce_scatter expects a leading dim of size P"
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("reduce_scatter", (p - 1) * nbytes(out), (p - 1) * nbytes(out))
    _reduce_scatter_single(out.view(-1), x.contiguous().view(-1), group=group)
    return out


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all over dim 0: ``x [P, ...]``, slice j goes to rank j; returns ``[P, ...]`` where slice
    i came from rank i."""
    p = dist.get_world_size(group)
    assert x.shape[0] == p, "all_to_all expects a leading dim of size P"
    out = torch.empty_like(x)
    _record("all_to_all", nbytes(x) * (p - 1) // p, nbytes(x) * (p - 1) // p)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    p = dist.get_world_size(group)
    _record("all_reduce", 2 * (p - 1) * nbytes(x) // p, 2 * (p - 1) * nbytes(x) // p)
    dist.all_reduce(x, op=op, group=group)
    return x


class RingComm:
    """Send to rank+1 and receive from rank-1 (ranks within ``group``), asynchronously.

    ``send_recv(t)`` posts the exchange and returns the receive buffer; ``wait()`` completes every
    exchange posted since the last wait, so a strategy can post the next block's transfer and compute
    on the current block meanwhile.
    """

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.send_to = dist.get_global_rank(group, (self.rank + 1) % self.world_size) \
            if group is not None else (self.rank + 1) % self.world_size
        self.recv_from = dist.get_global_rank(group, (self.rank - 1) % self.world_size) \
            if group is not None else (self.rank - 1) % self.world_size
        self._ops: list = []
        self._reqs: list = []

    def send_recv(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty_like(t) if out is None else out
        self._ops += [dist.P2POp(dist.isend, t, self.send_to, self.group),
                      dist.P2POp(dist.irecv, out, self.recv_from, self.group)]
        _record("p2p", nbytes(t), nbytes(out))
        return out

    def commit(self) -> None:
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)
            self._ops = []

    def wait(self) -> None:
        self.commit()
        for r in self._reqs:
            r.wait()
        self._reqs = []
