"""LASP-2 over gloo CPU ranks against the single-process fp64 reference, its byte count, its errors.

Per-token gates g and packed documents (cu_seqlens) are checked in the same launches (see
``_gated_worker``) against the fp64 step-by-step recurrence of the whole sequence, with their bytes.

Each launch batches many checks (a launch costs seconds): for one P, both layouts x {fp64, fp32, bf16}
x {no decay, per-head decay [-2.0 strong, -0.05, -0.002 weak]}, each comparing out, dq, dk, dv with
``linear_attn_chunked`` run in fp64 on the unsharded (input-dtype-rounded) tensors. S = 840 gives
local chunks of 105..840 tokens, none a multiple of the kernel's 64-token chunk; Dk != Dv; B = 2, H = 3.
"""
import functools

import pytest
import torch
import torch.distributed as dist

from dist_attn.comm import CommRecorder
from dist_attn.lasp2 import lasp2_attention
from dist_attn.layout import LAYOUTS, shard
from dist_attn.kernels.flash_attn import softmax_kernel
from dist_attn.kernels.interface import triton_interpreting
from dist_attn.kernels.lightning_attn import linear_kernel
from dist_attn.kernels.lightning_attn.naive import linear_attn_chunked, linear_attn_recurrent
from tests.dist import run_distributed
from tests.utils import assert_close, assert_no_failures

B, H, DK, DV, S = 2, 3, 16, 24, 840
DECAYS = {"nodecay": None, "perhead": [-2.0, -0.05, -0.002]}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(s, dtype, seed=0):
    """Global q, k [B,S,H,Dk], v, dout [B,S,H,Dv] in ``dtype``, same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, s, H, DK, generator=gen) for _ in range(2))
    v, dout = (torch.randn(B, s, H, DV, generator=gen) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, dout)]


def _decay(name, dtype=torch.float32):
    return None if DECAYS[name] is None else torch.tensor(DECAYS[name], dtype=dtype)


def _reference(q, k, v, dout, decay):
    """fp64 out and grads of the whole sequence on one process."""
    q, k, v = (t.detach().double().clone().requires_grad_(True) for t in (q, k, v))
    out, _ = linear_attn_chunked(q, k, v, decay=None if decay is None else decay.double())
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _run_local(rank, p, layout, q, k, v, dout, decay, **kw):
    """Shard the global tensors, run LASP-2 forward and backward; returns out, dq, dk, dv shards."""
    ql, kl, vl = (shard(t.detach(), rank, p, layout).requires_grad_(True) for t in (q, k, v))
    out = lasp2_attention(ql, kl, vl, group=dist.group.WORLD, decay=decay, layout=layout, **kw)
    out.backward(shard(dout, rank, p, layout))
    return out.detach(), ql.grad, kl.grad, vl.grad


def _correctness_worker(rank, p):
    failures, checked = [], 0
    cases = [(lay, dn, dt, None) for lay in LAYOUTS for dn in DECAYS for dt in DTYPES]
    # a plain differentiable callable (wrapped by linear_kernel_from_autograd) with a 48-token chunk
    cases.append(("zigzag", "perhead", "fp32", functools.partial(linear_attn_chunked, chunk_size=48)))
    for layout, dname, dtname, local in cases:
        dtype = DTYPES[dtname]
        q, k, v, dout = _inputs(S, dtype)
        decay = _decay(dname)
        refs = _reference(q, k, v, dout, decay)
        outs = _run_local(rank, p, layout, q, k, v, dout, decay, local_linear=local)
        for name, ref, got in zip(("out", "dq", "dk", "dv"), refs, outs):
            tag = f"P={p} {layout} {dname} {dtname}{' callable' if local else ''} {name}"
            assert got.dtype == dtype, f"{tag}: dtype {got.dtype}"
            try:
                assert_close(tag, shard(ref, rank, p, layout), got, dtype=dtype)
            except AssertionError as e:
                failures.append(str(e))
            checked += 1

    # bytes: one all-gather forward and one backward, (P-1)·c·B·H·Dk·Dv·4 each, the same for two S
    byte_counts = {}
    for layout in LAYOUTS:
        c = 2 if layout == "zigzag" else 1
        want = (p - 1) * c * B * H * DK * DV * 4
        for s in (S, 2 * S):
            q, k, v, dout = _inputs(s, torch.float32)
            ql, kl, vl = (shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v))
            with CommRecorder() as fwd:
                out = lasp2_attention(ql, kl, vl, group=None, decay=_decay("perhead"), layout=layout)
            with CommRecorder() as bwd:
                out.backward(shard(dout, rank, p, layout))
            calls = 0 if p == 1 else 1
            for what, rec in (("forward", fwd), ("backward", bwd)):
                got = (rec.total_sent, rec.total_recv, dict(rec.calls))
                if got != (want, want, {"all_gather": calls} if calls else {}):
                    failures.append(f"P={p} {layout} S={s} {what}: sent/recv/calls {got}, expected "
                                    f"{want} bytes and {calls} all_gather")
                byte_counts[(layout, s, what)] = rec.total_sent
        if byte_counts[(layout, S, "forward")] != byte_counts[(layout, 2 * S, "forward")]:
            failures.append(f"P={p} {layout}: forward bytes depend on S")
    return failures, checked


# --- per-token gates g and packed documents (cu_seqlens) ------------------------------------------
# S = 240: zigzag chunks of 120 / 60 / 40 / 30 tokens for P = 1 / 2 / 3 / 4, contiguous 240 / 120 / 80 / 60.
# They run in the same launch as the plain cases (a launch costs seconds).
# The documents hold 1-token documents (first, at chunk starts 60 and 120, last), starts exactly on
# chunk boundaries (60, 120, 150 = 5 x 30), an empty document (97, 97) and documents spanning ranks.
SG = 240
GDECAY = [-0.3, -0.01, 0.0]  # the last head is gated by g alone
GDOCS = {"nodocs": None, "docs": [0, 1, 2, 60, 61, 97, 97, 120, 121, 150, 239, 240]}


def _gated_case(docs, gated, seed):
    """Global inputs (bf16-representable, so one fp64 reference serves fp64, fp32 and bf16 runs) and
    the fp64 recurrence's out, dq, dk, dv, dg on them."""
    q, k, v, dout = (t.double() for t in _inputs(SG, torch.bfloat16, seed))
    gen = torch.Generator().manual_seed(seed + 1)
    g = (-0.2 * torch.rand(B, SG, H, generator=gen, dtype=torch.float64)) if gated else None
    cu = None if GDOCS[docs] is None else torch.tensor(GDOCS[docs], dtype=torch.int32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v) + ((g,) if gated else ())]
    out, _ = linear_attn_recurrent(*leaves[:3], decay=torch.tensor(GDECAY).double(),  # the fp32 values
                                   g=leaves[3] if gated else None, cu_seqlens=cu)
    out.backward(dout)
    refs = (out.detach(),) + tuple(t.grad for t in leaves)
    return dict(tag=f"{docs} {'g' if gated else 'nog'}", inputs=(q, k, v, dout, g), cu=cu, refs=refs)


@functools.lru_cache(maxsize=1)
def _gated_cases():
    """(case, dtype name) pairs: three references (gates, documents, both), each run in fp32 and bf16,
    the last also in fp64."""
    refs = [_gated_case(d, gt, seed) for seed, (d, gt) in enumerate(
        [("nodocs", True), ("docs", False), ("docs", True)])]
    return [(c, dt) for c in refs for dt in ("fp32", "bf16")] + [(refs[-1], "fp64")]


def _gated_worker(rank, p, cases):
    failures, checked = [], 0
    decay = torch.tensor(GDECAY)
    chunked48 = functools.partial(linear_attn_chunked, chunk_size=48)
    runs = [(case, dt, layout, None) for case, dt in cases for layout in LAYOUTS] + \
        [cases[-1] + ("zigzag", chunked48)]  # a plain callable (autograd-wrapped) with g and documents
    for case, dtname, layout, local in runs:
        dtype = DTYPES[dtname]
        q, k, v, dout = (t.to(dtype) for t in case["inputs"][:4])
        g = case["inputs"][4]
        g = None if g is None else g.to(torch.promote_types(dtype, torch.float32))
        ql, kl, vl = (shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v))
        gl = None if g is None else shard(g, rank, p, layout).requires_grad_(True)
        out = lasp2_attention(ql, kl, vl, group=dist.group.WORLD, layout=layout, decay=decay, g=gl,
                              cu_seqlens=case["cu"], local_linear=local)
        out.backward(shard(dout, rank, p, layout))
        got = (out, ql.grad, kl.grad, vl.grad) + (() if g is None else (gl.grad,))
        for name, ref, x in zip(("out", "dq", "dk", "dv", "dg"), case["refs"], got):
            tag = f"P={p} {layout} {case['tag']} {dtname}{' callable' if local else ''} {name}"
            want_dtype = g.dtype if name == "dg" else dtype
            try:
                assert x.dtype == want_dtype, f"{tag}: dtype {x.dtype}"
                assert_close(tag, shard(ref, rank, p, layout), x, dtype=dtype)
            except AssertionError as e:
                failures.append(str(e))
            checked += 1

    # bytes: with g the forward gathers [A; M], (P-1)·c·B·H·(1 + Dk·Dv)·4, the backward only the state
    # gradients, (P-1)·c·B·H·Dk·Dv·4; documents alone move nothing extra; the same for two S
    calls = {"all_gather": 1} if p > 1 else {}
    for layout in LAYOUTS:
        c = 2 if layout == "zigzag" else 1
        for gated, docs in ((True, False), (False, True), (True, True)):
            want_f = (p - 1) * c * B * H * ((1 if gated else 0) + DK * DV) * 4
            want_b = (p - 1) * c * B * H * DK * DV * 4
            for s in (SG, 2 * SG):
                q, k, v, dout = _inputs(s, torch.float32)
                ql, kl, vl = (shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v))
                gl = -torch.rand(B, s // p, H) if gated else None
                cu = torch.tensor([0, 1, s // 3, s // 3, s - 1, s]) if docs else None
                with CommRecorder() as fwd:
                    out = lasp2_attention(ql, kl, vl, group=None, decay=decay, g=gl, layout=layout, cu_seqlens=cu)
                with CommRecorder() as bwd:
                    out.backward(shard(dout, rank, p, layout))
                for what, rec, want in (("forward", fwd, want_f), ("backward", bwd, want_b)):
                    got = (rec.total_sent, rec.total_recv, dict(rec.calls))
                    if got != (want, want, calls):
                        failures.append(f"P={p} {layout} g={gated} docs={docs} S={s} {what}: sent/recv/calls "
                                        f"{got}, expected {want} bytes and {calls}")
    return failures, checked


def _worker(rank, p, gated_cases):
    """One launch per P: the plain cases and bytes, then the gated / document cases and bytes."""
    plain = _correctness_worker(rank, p)
    gated = _gated_worker(rank, p, gated_cases)
    return plain[0] + gated[0], (plain[1], gated[1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("p", [1, 2, 3, 4], ids=lambda p: f"P{p}")
def test_lasp2_matches_reference_and_bytes(p):
    cases = _gated_cases()
    counts = assert_no_failures(run_distributed(_worker, p, cases, timeout=260, reuse=True))
    n_grads = sum(5 if c["inputs"][4] is not None else 4 for c, _ in cases)
    assert all(n == (4 * (2 * len(DECAYS) * len(DTYPES) + 1), 2 * n_grads + 5) for n in counts)


def _triton_worker(rank, p):
    """Small case through the Triton kernel (CPU interpreter): the batched zigzag chunks, no
    initial state and a None final-state gradient are what LASP-2 hands the kernel."""
    q, k, v, dout = _inputs(2 * p * 20, torch.float32)
    decay = torch.tensor([-0.3, -0.05, -0.01])
    refs = _reference(q, k, v, dout, decay)
    got = {}
    for layout in LAYOUTS:
        outs = _run_local(rank, p, layout, q, k, v, dout, decay, local_linear=linear_kernel("triton"))
        for name, ref, out in zip(("out", "dq", "dk", "dv"), refs, outs):
            got[f"{layout} {name}"] = assert_close(f"triton {layout} {name}", shard(ref, rank, p, layout), out)
    # per-token gates and documents (one starting on the chunk boundary 20, a 1-token one, one spanning ranks)
    g = -0.3 * torch.rand(B, q.shape[1], H, generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 20, 21, 33, q.shape[1]], dtype=torch.int32)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, g)]
    ref_out, _ = linear_attn_recurrent(*leaves[:3], decay=decay.double(), g=leaves[3], cu_seqlens=cu)
    ref_out.backward(dout.double())
    refs = (ref_out.detach(),) + tuple(t.grad for t in leaves)
    for layout in LAYOUTS:
        ql, kl, vl, gl = (shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v, g))
        out = lasp2_attention(ql, kl, vl, group=dist.group.WORLD, decay=decay, g=gl, cu_seqlens=cu,
                              layout=layout, local_linear=linear_kernel("triton"))
        out.backward(shard(dout, rank, p, layout))
        for name, ref, x in zip(("out", "dq", "dk", "dv", "dg"), refs, (out, ql.grad, kl.grad, vl.grad, gl.grad)):
            got[f"{layout} gated {name}"] = assert_close(f"triton {layout} g+docs {name}",
                                                         shard(ref, rank, p, layout), x)
    return got


@pytest.mark.timeout(180)
@pytest.mark.skipif(torch.cuda.is_available() or not triton_interpreting(), reason="CPU interpreter run only")
def test_lasp2_with_triton_kernel():
    results = run_distributed(_triton_worker, 2, timeout=150, reuse=True)
    assert all(len(r) == 18 for r in results)


def _error_cases():
    """(name, substring expected in the message, kwargs overriding a valid call)."""
    q, k = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    v = torch.randn(1, 8, 2, 6)
    return [
        ("dk_mismatch", "head_dim", dict(k=torch.randn(1, 8, 2, 5))),
        ("v_heads", "same number of heads", dict(v=torch.randn(1, 8, 1, 6))),
        ("gqa_heads", "same number of heads", dict(k=torch.randn(1, 8, 1, 4), v=torch.randn(1, 8, 1, 6))),
        ("not_4d", "4-D", dict(q=torch.randn(8, 2, 4))),
        ("dtype_mix", "one dtype", dict(v=v.double())),
        ("int_dtype", "fp16/bf16/fp32/fp64", dict(q=q.long(), k=k.long(), v=v.long())),
        ("decay_shape", "shape [H]", dict(decay=torch.zeros(3))),
        ("decay_positive", "<= 0", dict(decay=torch.tensor([-0.1, 0.2]))),
        ("decay_nan", "<= 0", dict(decay=torch.tensor([float("nan"), -0.1]))),
        ("decay_type", "shape [H]", dict(decay=[-0.1, -0.2])),
        ("layout", "expected one of", dict(layout="ring")),
        ("seq_len", "divisible by 4", dict(q=q[:, :5], k=k[:, :5], v=v[:, :5])),
        ("kernel_int", "LinearKernel", dict(local_linear=42)),
        ("kernel_softmax", "LinearKernel", dict(local_linear=softmax_kernel("auto"))),
        ("scale_type", "scale", dict(scale="0.5")),
        ("g_shape", "g a floating tensor", dict(g=torch.zeros(1, 8, 3))),
        ("g_int", "g a floating tensor", dict(g=torch.zeros(1, 8, 2, dtype=torch.int64))),
        ("g_positive", "log-gate values g <= 0", dict(g=torch.full((1, 8, 2), 0.5))),
        ("g_nan", "log-gate values g <= 0", dict(g=torch.full((1, 8, 2), float("nan")))),
        ("cu_start", "start at 0", dict(cu_seqlens=torch.tensor([1, 16]))),
        ("cu_local_end", "global sequence length S=16", dict(cu_seqlens=torch.tensor([0, 3, 8]))),
        ("cu_decreasing", "never decreasing", dict(cu_seqlens=torch.tensor([0, 9, 5, 16]))),
        ("cu_float", "int32/int64", dict(cu_seqlens=torch.tensor([0.0, 16.0]))),
        ("cu_2d", "1-D", dict(cu_seqlens=torch.tensor([[0, 16]]))),
        ("cu_list", "torch tensor", dict(cu_seqlens=[0, 16])),
    ], dict(q=q, k=k, v=v)


def _errors_worker(rank, p):
    cases, base = _error_cases()
    got = {}
    for name, _, override in cases:
        kw = dict(base, group=dist.group.WORLD, decay=None, layout="zigzag")
        kw.update(override)
        try:
            lasp2_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
            got[name] = "no error"
        except ValueError as e:
            got[name] = str(e)
    # a rank outside the group is refused; the member (rank 0) runs on its own group of one
    sub = dist.new_group([0])
    try:
        lasp2_attention(base["q"], base["k"], base["v"], group=sub, layout="zigzag")
        got["membership"] = "no error"
    except ValueError as e:
        got["membership"] = str(e)
    # nothing above issued a collective: the group is still in step for a valid call
    out = lasp2_attention(base["q"], base["k"], base["v"], group=dist.group.WORLD, layout="zigzag")
    return got, tuple(out.shape)


@pytest.mark.timeout(120)
def test_lasp2_errors_on_every_rank():
    results = run_distributed(_errors_worker, 2, timeout=90, raise_errors=False, reuse=True)
    cases, _ = _error_cases()
    for rank, res in enumerate(results):
        assert isinstance(res, tuple), f"rank {rank} failed: {res}"
        got, shape = res
        assert shape == (1, 8, 2, 6)
        for name, needle, _ in cases:
            msg = got[name]
            assert needle in msg and "expect" in msg and "Fix" in msg, f"rank {rank} {name}: {msg}"
        if rank == 0:
            assert got["membership"] == "no error"
        else:
            assert "member" in got["membership"], got["membership"]
