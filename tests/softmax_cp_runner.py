"""Shared runner for the softmax CP strategy tests (ring and all-gather): case tables, the per-launch
case worker (outputs and dq/dk/dv of every rank's shard vs the fp64 reference, bytes vs the closed
forms) and the error runner (bad inputs raise ``ValueError`` on every rank before any collective).
Used by ``tests/test_ring.py`` and ``tests/test_allgather.py``."""
from __future__ import annotations

import torch

from tests.dist import RankError, run_distributed

# name, layout, causal, dtype, B, C (tokens per chunk: S = 2P·C), Hq, Hkv, D, local kernel
CASES = [
    ("zz-causal-fp32-gqa-b2", "zigzag", True, torch.float32, 2, 12, 4, 2, 64, "default"),
    ("zz-causal-bf16-mha-d96", "zigzag", True, torch.bfloat16, 1, 16, 2, 2, 96, "default"),
    ("zz-full-fp32-mqa", "zigzag", False, torch.float32, 1, 10, 4, 1, 64, "default"),
    ("zz-full-bf16-gqa-b2-d96", "zigzag", False, torch.bfloat16, 2, 8, 4, 2, 96, "default"),
    ("ct-causal-fp32-mha-b2-d96", "contiguous", True, torch.float32, 2, 10, 2, 2, 96, "default"),
    ("ct-causal-bf16-gqa", "contiguous", True, torch.bfloat16, 1, 12, 4, 2, 64, "default"),
    ("ct-full-bf16-mqa-b2", "contiguous", False, torch.bfloat16, 2, 8, 3, 1, 64, "default"),
    ("zz-causal-fp32-callable", "zigzag", True, torch.float32, 1, 9, 2, 1, 64, "callable"),
]
# local chunks of several kernel blocks (a zigzag half of 160 tokens; contiguous 320 per rank)
LONG_CASES = [
    ("zz-causal-fp32-long", "zigzag", True, torch.float32, 1, 160, 2, 1, 64, "default"),
    ("ct-causal-bf16-long", "contiguous", True, torch.bfloat16, 1, 160, 2, 2, 64, "default"),
]
# the Triton kernel (CPU interpreter, 64 x 64 tiles): 80-token local shards, 40-token halves
TRITON_CASES = [("zz-causal-bf16-triton", "zigzag", True, torch.bfloat16, 1, 40, 2, 1, 64, "triton")]


def cases_for(world: int, strategy: str) -> list:
    """The batch of one launch: everything at P = 2 and 4, a covering subset at P = 1 and 3."""
    if world == 1:
        return CASES[:3]
    if world == 3:
        return [CASES[i] for i in (0, 1, 2, 4, 6)]
    if world == 2:
        return CASES + LONG_CASES + (TRITON_CASES if strategy == "ring" else [])
    return CASES


def _strategy(name):
    if name == "ring":
        from dist_attn.ring import ring_attention
        return ring_attention
    from dist_attn.allgather import allgather_attention
    return allgather_attention


def expected_bytes(strategy, world, b, n, hkv, d, elem):
    """Closed forms of the docstrings, per rank: ({kind: forward bytes}, {kind: backward bytes})."""
    kv = 2 * (world - 1) * b * n * hkv * d          # 2(P-1)/P·B·N·Hkv·D, times the element size
    assert kv % world == 0
    kv //= world
    if world == 1:
        return {}, {}
    if strategy == "ring":
        return {"p2p": kv * elem}, {"p2p": kv * (elem + 4)}
    return {"all_gather": kv * elem}, {"all_gather": kv * elem, "reduce_scatter": kv * 4}


def _inputs(case, world, seed):
    _, layout, causal, dtype, b, c, hq, hkv, d, _ = case
    s = 2 * world * c
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def run_case(fn, case, rank, world, group, seed, check_bytes=None):
    """Run one case on this rank; assert out/dq/dk/dv vs the fp64 reference; return the rms ratios."""
    from dist_attn.comm import CommRecorder
    from dist_attn.layout import shard
    from dist_attn.kernels.flash_attn.naive import attention_ref
    from tests.utils import assert_close

    name, layout, causal, dtype, b, c, hq, hkv, d, kind = case
    q, k, v, dout = _inputs(case, world, seed)
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = attention_ref(*ref, causal=causal)
    ref_out.backward(dout.double())
    loc = [shard(t, rank, world, layout).requires_grad_(True) for t in (q, k, v)]
    local_attn = {"default": None, "callable": attention_ref}.get(kind)
    if kind == "triton":
        from dist_attn.kernels.flash_attn import softmax_kernel
        local_attn = softmax_kernel("triton")
    with CommRecorder() as fwd_rec:
        out = fn(*loc, group=group, causal=causal, layout=layout, local_attn=local_attn)
    with CommRecorder() as bwd_rec:
        out.backward(shard(dout, rank, world, layout))
    assert out.dtype == dtype and all(t.grad.dtype == dtype for t in loc)
    errs = {"out": assert_close(f"{name} P={world} rank {rank} out", shard(ref_out, rank, world, layout), out)}
    for label, r, t in zip(("dq", "dk", "dv"), ref, loc):
        errs[label] = assert_close(f"{name} P={world} rank {rank} {label}", shard(r.grad, rank, world, layout),
                                   t.grad)
    if check_bytes is not None:
        fwd, bwd = expected_bytes(check_bytes, world, b, 2 * world * c, hkv, d, q.element_size())
        for rec, want, what in ((fwd_rec, fwd, "forward"), (bwd_rec, bwd, "backward")):
            got_sent = {key: val for key, val in rec.sent.items() if val}
            got_recv = {key: val for key, val in rec.recv.items() if val}
            assert got_sent == want and got_recv == want, \
                f"{name} P={world} {what} bytes: sent {got_sent}, recv {got_recv}, closed form {want}"
    return errs


def cases_worker(rank, world, strategy, cases, small_blocks=False):
    if small_blocks:  # key blocks of 64 in the torch kernel, so long local chunks span several blocks
        from dist_attn.kernels.flash_attn import torch_kernel
        torch_kernel._MAX_TILE_ELEMS = 1
    fn = _strategy(strategy)
    return {case[0]: run_case(fn, case, rank, world, None, seed=i, check_bytes=strategy)
            for i, case in enumerate(cases)}


def _bad_inputs(rank, world):
    """(label, kwargs overrides, expected message fragment) fed identically to every rank."""
    from dist_attn.kernels.lightning_attn import linear_kernel
    s = 6
    q, k, v = torch.randn(1, s, 4, 32), torch.randn(1, s, 2, 32), torch.randn(1, s, 2, 32)
    return [
        ("3-D q", dict(q=q[0]), "4-D"),
        ("dtype mix", dict(k=k.bfloat16()), "one dtype"),
        ("heads", dict(q=torch.randn(1, s, 3, 32)), "multiple of key/value heads"),
        ("kv length", dict(k=k[:, :4], v=v[:, :4]), "local sequence"),
        ("layout", dict(layout="ring"), "expected one of"),
        ("odd zigzag", dict(q=q[:, :5], k=k[:, :5], v=v[:, :5]), "divisible by"),
        ("causal type", dict(causal="yes"), "causal to be a bool"),
        ("scale", dict(softmax_scale=-1.0), "softmax_scale"),
        ("local_attn", dict(local_attn=42), "local_attn"),
        ("linear kernel", dict(local_attn=linear_kernel("torch")), "local_attn"),
    ], dict(q=q, k=k, v=v, layout="zigzag", causal=True)


def errors_worker(rank, world, strategy):
    """Every bad input raises ValueError (checked here); after each, a valid call still completes,
    so no rank left a collective half-issued. The last bad input is left uncaught for the parent."""
    import torch.distributed as dist
    fn = _strategy(strategy)
    cases, good = _bad_inputs(rank, world)
    for label, over, frag in cases:
        kw = dict(good, **over)
        try:
            fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), group=None, **kw)
        except ValueError as e:
            assert frag in str(e) and "Fix:" in str(e), f"{label}: unexpected message {e}"
        else:
            raise AssertionError(f"{label}: no ValueError")
        out = fn(good["q"], good["k"], good["v"], group=None)
        assert out.shape == good["q"].shape
    # a group this rank is not part of: only that rank raises, rank 0 (a group of one) runs
    sub = dist.new_group([0])
    if rank == 0:
        fn(good["q"], good["k"], good["v"], group=sub)
    else:
        try:
            fn(good["q"], good["k"], good["v"], group=sub)
        except ValueError as e:
            assert "member" in str(e), str(e)
        else:
            raise AssertionError("non-member group: no ValueError")
    fn(good["q"], good["k"][:, :4], good["v"][:, :4], group=None)  # uncaught: reported to the parent


def check_errors(strategy):
    res = run_distributed(errors_worker, 2, strategy, raise_errors=False, timeout=120, reuse=True)
    for r, e in enumerate(res):
        assert isinstance(e, RankError), f"rank {r}: no error"
        assert e.type_name == "ValueError", f"rank {r}: {e.type_name}: {e.message}\n{e.traceback}"
        assert "local sequence" in e.message and "Fix:" in e.message
