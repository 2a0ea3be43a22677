"""short_conv (causal depthwise conv with a P2P halo) over gloo ranks vs a single-process fp64 reference.

One launch per P = 1..4 runs both layouts x {no documents, documents} x {fp32, bf16} x K in {4, 2}
(+ no bias / no activation), comparing y and the gradients of x, weight and bias with F.conv1d run per
document on the whole sequence. S = 48 gives chunks of 6..48 tokens; documents include 1-token ones
and starts on chunk boundaries and inside a halo. Also: exact halo bytes, and error paths.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_attn.comm import CommRecorder
from dist_attn.layout import LAYOUTS, rank_chunks, shard
from dist_attn.short_conv import short_conv
from tests.dist import run_distributed
from tests.utils import assert_no_failures, collect_close, value_error_report

B, C, S = 2, 5, 48
DOCS = [0, 1, 6, 7, 12, 14, 24, 25, 40, 48]


def _reference(x, w, bias, docs, activation):
    """fp64: F.conv1d with K-1 zeros of left padding, separately on every document."""
    k = w.shape[1]
    bounds = docs or [0, x.shape[1]]
    pieces = []
    for a, e in zip(bounds[:-1], bounds[1:]):
        if e > a:
            seg = F.pad(x[:, a:e].transpose(1, 2), (k - 1, 0))
            pieces.append(F.conv1d(seg, w[:, None, :], bias, groups=w.shape[0]).transpose(1, 2))
    y = torch.cat(pieces, 1)
    return F.silu(y) if activation == "silu" else y


def _case(rank, p, layout, dtype, docs, k, with_bias, activation, seed):
    gen = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(B, S, C, generator=gen).to(dtype) for _ in range(2))
    w, bias = torch.randn(C, k, generator=gen).to(dtype), torch.randn(C, generator=gen).to(dtype)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, w, bias)]
    ref = _reference(leaves[0], leaves[1], leaves[2] if with_bias else None, docs, activation)
    ref.backward(dy.double())
    xl = shard(x, rank, p, layout).requires_grad_(True)
    wl, bl = w.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    y = short_conv(xl, wl, group=dist.group.WORLD, layout=layout, cu_seqlens=cu,
                   bias=bl if with_bias else None, activation=activation)
    y.backward(shard(dy, rank, p, layout))
    out = [("y", shard(ref.detach(), rank, p, layout), y), ("dx", shard(leaves[0].grad, rank, p, layout), xl.grad)]
    # weight/bias gradients are sums over every rank's tokens
    dw, db = wl.grad.clone(), (bl.grad.clone() if with_bias else torch.zeros_like(bias))
    dist.all_reduce(dw)
    dist.all_reduce(db)
    out += [("dweight", leaves[1].grad, dw)] + ([("dbias", leaves[2].grad, db)] if with_bias else [])
    return out


def _worker(rank, p):
    failures, checked = [], 0
    cases = [(lay, dt, docs, k, True, "silu") for lay in LAYOUTS for dt in (torch.float32, torch.bfloat16)
             for docs in (None, DOCS) for k in (4,)]
    cases += [("zigzag", torch.float32, DOCS, 2, True, "silu"), ("contiguous", torch.float32, DOCS, 2, True, "silu"),
              ("zigzag", torch.float64, DOCS, 4, False, None), ("contiguous", torch.float64, None, 1, True, None)]
    for n, (layout, dtype, docs, k, with_bias, act) in enumerate(cases):
        for name, ref, got in _case(rank, p, layout, dtype, docs, k, with_bias, act, seed=n):
            tag = f"P={p} {layout} {dtype} docs={docs is not None} K={k} bias={with_bias} {act} {name}"
            collect_close(failures, tag, ref, got, dtype)
            checked += 1

    # bytes: one B·(K-1)·C message per tail needed on another rank, the same amount back in backward
    for layout in LAYOUTS:
        ids = rank_chunks(rank, p, layout)
        needed = sum(1 for j in ids if j + 1 < (2 * p if layout == "zigzag" else p) and (j + 1) not in ids)
        received = sum(1 for j in ids if j > 0 and (j - 1) not in ids)
        x = torch.randn(B, S // p, C, requires_grad=True)
        with CommRecorder() as fwd:
            y = short_conv(x, torch.randn(C, 4), group=None, layout=layout)
        with CommRecorder() as bwd:
            y.sum().backward()
        one = B * 3 * C * 4
        for what, rec, sent, recv in (("forward", fwd, needed, received), ("backward", bwd, received, needed)):
            if (rec.total_sent, rec.total_recv) != (sent * one, recv * one):
                failures.append(f"P={p} {layout} {what}: sent/recv {rec.total_sent}/{rec.total_recv}, "
                                f"expected {sent * one}/{recv * one}")
    if p == 1:  # error paths ride on the P = 1 launch
        failures += [f"error case {k}: {v}" for k, v in _errors().items() if v != "ok"]
    return failures, checked


@pytest.mark.timeout(180)
@pytest.mark.parametrize("p", [1, 2, 3, 4], ids=lambda p: f"P{p}")
def test_short_conv_matches_conv1d(p):
    counts = assert_no_failures(run_distributed(_worker, p, timeout=150, reuse=True))
    assert all(n > 0 for n in counts)


def _errors():
    x, w = torch.randn(1, 8, 3), torch.randn(3, 4)
    cases = [
        ("x_2d", "[B, S/P, C]", dict(x=torch.randn(8, 3))),
        ("weight_shape", "weight [C, K]", dict(weight=torch.randn(4, 4))),
        ("bias_shape", "bias None or [C]", dict(bias=torch.randn(2))),
        ("activation", "activation one of", dict(activation="gelu")),
        ("layout", "expected one of", dict(layout="ring")),
        ("seq_len", "divisible by 2", dict(x=torch.randn(1, 5, 3))),
        ("short_chunk", "at least K-1", dict(weight=torch.randn(3, 6))),
        ("cu_end", "end at the global sequence length", dict(cu_seqlens=torch.tensor([0, 3, 7]))),
    ]

    def call(**over):
        kw = {"x": x, "weight": w, **over}
        short_conv(kw.pop("x"), kw.pop("weight"), group=None, **kw)
    return value_error_report(call, cases)

