"""Gated delta rule: kernels vs the fp64 step-by-step recurrence, the affine chunk map, and
gated_delta_attention over gloo CPU ranks (P = 1..4, both layouts, documents, fp32/bf16) with its bytes
and error paths.

Shapes are awkward on purpose: S = 37 or 72 tokens, Dk != Dv, kernel chunks of 8/16/64 that do not
divide the ranks' chunks (9..72 tokens). Documents include 1-token documents, an empty document and
starts on kernel-chunk and rank-chunk boundaries. k is L2-normalised as the layer does.
"""
import functools

import pytest
import torch
import torch.distributed as dist

from dist_attn import gated_delta_attention
from dist_attn.comm import CommRecorder
from dist_attn.layout import LAYOUTS, shard
from dist_attn.kernels.gated_delta import delta_kernel
from dist_attn.kernels.gated_delta.naive import gated_delta_chunked, gated_delta_recurrent
from tests.dist import run_distributed
from tests.utils import assert_close, assert_no_failures, collect_close, value_error_report

B, H, DK, DV = 2, 2, 8, 6
NAMES = ("dq", "dk", "dv", "dbeta", "dg")


def _inputs(s, dtype=torch.float64, seed=0, state=False):
    """q, k (unit rows), v, beta in (0, 1), g <= 0, dout (and a random initial state / its gradient)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, s, H, DK, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, s, H, DK, generator=gen), dim=-1)
    v, dout = (torch.randn(B, s, H, DV, generator=gen) for _ in range(2))
    beta = torch.sigmoid(torch.randn(B, s, H, generator=gen))
    g = torch.nn.functional.logsigmoid(torch.randn(B, s, H, generator=gen) + 2.0)
    out = [t.to(dtype) for t in (q, k, v, beta, g, dout)]
    if state:
        acc = torch.promote_types(dtype, torch.float32)  # states are fp32 (fp64 for fp64 inputs)
        out += [torch.randn(B, H, DK, DV, generator=gen).to(acc), torch.randn(B, H, DK, DV, generator=gen).to(acc)]
    return out


def _reference(fn, q, k, v, beta, g, dout, s0=None, dfinal=None, **kw):
    """fp64 out, final state and the gradients (q, k, v, beta, g[, initial state]) of ``fn``."""
    ins = [t.detach().double().requires_grad_(True) for t in (q, k, v, beta, g)]
    s0 = None if s0 is None else s0.double().requires_grad_(True)
    out, final = fn(*ins, initial_state=s0, **kw)
    loss = (out * dout.double()).sum() + (0 if dfinal is None else (final * dfinal.double()).sum())
    grads = torch.autograd.grad(loss, ins + ([s0] if s0 is not None else []))
    return out.detach(), final.detach(), grads


DOCS = {"nodocs": None, "docs": [0, 1, 2, 8, 16, 17, 30, 30, 37]}  # 1-token docs, empty doc, chunk starts


@pytest.mark.parametrize("docs", DOCS)
def test_naive_chunked_matches_recurrence(docs):
    q, k, v, beta, g, dout, s0, dfin = _inputs(37, state=True)
    ref = _reference(gated_delta_recurrent, q, k, v, beta, g, dout, s0, dfin, cu_seqlens=DOCS[docs])
    got = _reference(gated_delta_chunked, q, k, v, beta, g, dout, s0, dfin, cu_seqlens=DOCS[docs], chunk_size=8)
    for name, r, o in zip(("out", "final") + NAMES + ("dinit",), ref[:2] + ref[2], got[:2] + got[2]):
        assert_close(f"naive chunked {docs} {name}", r, o, dtype=torch.float64)


@pytest.mark.parametrize("docs", DOCS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_torch_kernel_matches_recurrence(dtype, docs):
    """fwd and bwd of the kernel object (chunks 16 and 64) vs the recurrence on the rounded inputs."""
    q, k, v, beta, g, dout, s0, dfin = _inputs(37, dtype, state=True)
    cu = None if DOCS[docs] is None else torch.tensor(DOCS[docs])
    ref_out, ref_fin, ref_grads = _reference(gated_delta_recurrent, q, k, v, beta, g, dout, s0, dfin, cu_seqlens=cu)
    for chunk in (16, 64):
        kern = delta_kernel("torch", chunk_size=chunk)
        out, fin = kern.fwd(q, k, v, beta, g, initial_state=s0, cu_seqlens=cu)
        assert out.dtype == dtype and fin.dtype == torch.promote_types(dtype, torch.float32)
        grads = kern.bwd(dout, dfin, q, k, v, beta, g, initial_state=s0, cu_seqlens=cu)
        tag = f"torch[{chunk}] {dtype} {docs}"
        assert_close(f"{tag} out", ref_out, out, dtype=dtype)
        assert_close(f"{tag} final", ref_fin, fin, dtype=dtype)
        for name, r, o in zip(NAMES + ("dinit",), ref_grads, grads):
            assert_close(f"{tag} {name}", r, o, dtype=dtype)
    # the differentiable __call__ without an initial state
    qq, kk, vv, bb, gg = (t.detach().clone().requires_grad_(True) for t in (q, k, v, beta, g))
    out, _ = delta_kernel("torch")(qq, kk, vv, bb, gg, cu_seqlens=cu)
    out.backward(dout)
    r_out, _, r_grads = _reference(gated_delta_recurrent, q, k, v, beta, g, dout, cu_seqlens=cu)
    assert_close("call out", r_out, out, dtype=dtype)
    for name, r, t in zip(NAMES, r_grads, (qq, kk, vv, bb, gg)):
        assert_close(f"call {name}", r, t.grad, dtype=dtype)


@pytest.mark.parametrize("docs", DOCS)
def test_chunk_map_from_widened_call(docs):
    """One call with v' = [v | 0], S' = [0 | I] gives [o(v,0) | o(0,I)] and final [b | A]:
    A = prod_t exp(g_t)(I - beta_t k_t k_t^T) (0 across a document start), b = final state from zero,
    and o(v, S) = o(v, 0) + o(0, I) S for any S."""
    q, k, v, beta, g, _, s0, _ = _inputs(37, state=True)
    cu = None if DOCS[docs] is None else torch.tensor(DOCS[docs])
    v_aug = torch.cat([v, torch.zeros(B, 37, H, DK, dtype=v.dtype)], -1)
    init = torch.cat([torch.zeros(DK, DV), torch.eye(DK)], -1).double().expand(B, H, DK, DV + DK)
    out_aug, final = delta_kernel("torch", chunk_size=16).fwd(q, k, v_aug, beta, g, initial_state=init,
                                                              cu_seqlens=cu)
    amap = torch.eye(DK, dtype=torch.float64).expand(B, H, DK, DK)
    for t in range(37):
        kt = k[:, t]
        step = torch.exp(g[:, t])[..., None, None] * (torch.eye(DK, dtype=torch.float64) -
                                                     beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :])
        amap = step @ amap
    if cu is not None:
        amap = torch.zeros_like(amap)
    ref_out0, ref_b = gated_delta_recurrent(q, k, v, beta, g, cu_seqlens=cu)
    ref_out, ref_fin = gated_delta_recurrent(q, k, v, beta, g, initial_state=s0, cu_seqlens=cu)
    assert_close("b", ref_b, final[..., :DV])
    assert_close("A", amap, final[..., DV:])
    assert_close("o(v,0)", ref_out0, out_aug[..., :DV])
    assert_close("o(v,S)", ref_out, out_aug[..., :DV] + torch.einsum("bthk,bhkv->bthv", out_aug[..., DV:], s0))
    assert_close("S_out = A S + b", ref_fin, final[..., DV:] @ s0 + final[..., :DV])


def test_naive_matches_fla_naive():
    """Our fp64 recurrence vs fla-core's own naive recurrence (fp32), once."""
    try:
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fla.ops.gated_delta_rule.naive does not import here: {e!r}")
    q, k, v, beta, g, _, s0, _ = _inputs(37, state=True)
    ref, ref_fin = gated_delta_recurrent(q, k, v, beta, g, initial_state=s0)
    out, fin = naive_recurrent_gated_delta_rule(*(t.float() for t in (q, k, v, beta, g)), initial_state=s0.float(),
                                                output_final_state=True)
    assert_close("fla naive out", ref, out, dtype=torch.float32)
    assert_close("fla naive final", ref_fin, fin, dtype=torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need CUDA")
@pytest.mark.parametrize("docs", DOCS)
def test_fla_backend_matches_recurrence(docs):
    from dist_attn.kernels.gated_delta import fla_available
    if not fla_available():
        pytest.skip("fla-core does not import")
    q, k, v, beta, g, dout, s0, dfin = _inputs(37, torch.float32, state=True)
    cu = None if DOCS[docs] is None else torch.tensor(DOCS[docs])
    ref_out, ref_fin, ref_grads = _reference(gated_delta_recurrent, q, k, v, beta, g, dout, s0, dfin, cu_seqlens=cu)
    dev = [t.cuda() for t in (q, k, v, beta, g, dout, s0, dfin)]
    kern = delta_kernel("fla")
    out, fin = kern.fwd(*dev[:5], initial_state=dev[6], cu_seqlens=cu)
    grads = kern.bwd(dev[5], dev[7], *dev[:5], initial_state=dev[6], cu_seqlens=cu)
    assert_close("fla out", ref_out, out, scale=5)
    assert_close("fla final", ref_fin, fin, scale=5)
    for name, r, o in zip(NAMES + ("dinit",), ref_grads, grads):
        assert_close(f"fla {name}", r, o, scale=5)


# ----------------------------------------------------------------------------------------------------------
# gated_delta_attention over gloo ranks

S = 72  # rank chunks of 9..72 tokens (P = 1..4, both layouts)
GLOBAL_DOCS = [0, 1, 9, 10, 18, 24, 31, 36, 37, 55, 55, 72]  # starts on rank-chunk boundaries, 1-token docs


def _cp_case(rank, p, layout, dtype, docs, kernel, s=S):
    q, k, v, beta, g, dout = _inputs(s, dtype, seed=s)
    cu = None if docs is None else torch.tensor(docs)
    ref_out, _, ref_grads = _reference(gated_delta_recurrent, q, k, v, beta, g, dout, cu_seqlens=cu)
    ins = [shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v, beta, g)]
    out = gated_delta_attention(*ins, group=dist.group.WORLD, layout=layout, cu_seqlens=cu, local_kernel=kernel)
    out.backward(shard(dout, rank, p, layout))
    pairs = [("out", ref_out, out)] + [(n, r, t.grad) for n, r, t in zip(NAMES, ref_grads, ins)]
    return [(n, shard(r, rank, p, layout), o) for n, r, o in pairs]


def _cp_worker(rank, p):
    failures, checked = [], 0
    k8 = delta_kernel("torch", chunk_size=8)
    cases = [(lay, dt, dn, k8) for lay in LAYOUTS for dt in (torch.float32, torch.bfloat16) for dn in ("nodocs", "docs")]
    cases += [("zigzag", torch.float64, "docs", None),  # default kernel (64-token chunks), fp64
              ("contiguous", torch.float32, "docs", functools.partial(gated_delta_chunked, chunk_size=5))]
    for layout, dtype, dname, kernel in cases:
        docs = None if dname == "nodocs" else GLOBAL_DOCS
        for name, ref, got in _cp_case(rank, p, layout, dtype, docs, kernel):
            tag = f"P={p} {layout} {dtype} {dname} {'callable' if callable(kernel) and not hasattr(kernel, 'fwd') else ''} {name}"
            collect_close(failures, tag, ref, got, dtype)
            checked += 1

    # bytes: forward (P-1)·c·B·H·Dk·(Dk+Dv)·4, backward (P-1)·c·B·H·Dk·Dv·4, one all-gather each, for two S
    for layout in LAYOUTS:
        c = 2 if layout == "zigzag" else 1
        want = {"forward": (p - 1) * c * B * H * DK * (DK + DV) * 4, "backward": (p - 1) * c * B * H * DK * DV * 4}
        calls = {"all_gather": 1} if p > 1 else {}
        for s in (S, 4 * S):
            q, k, v, beta, g, dout = _inputs(s, torch.float32)
            ins = [shard(t, rank, p, layout).requires_grad_(True) for t in (q, k, v, beta, g)]
            with CommRecorder() as fwd:
                out = gated_delta_attention(*ins, group=None, layout=layout)
            with CommRecorder() as bwd:
                out.backward(shard(dout, rank, p, layout))
            for what, rec in (("forward", fwd), ("backward", bwd)):
                got = (rec.total_sent, rec.total_recv, dict(rec.calls))
                if got != (want[what], want[what], calls):
                    failures.append(f"P={p} {layout} S={s} {what}: sent/recv/calls {got}, expected {want[what]}")
    if p == 1:  # error paths ride on the P = 1 launch
        failures += [f"error case {k}: {v}" for k, v in _errors().items() if v != "ok"]
    return failures, checked


@pytest.mark.timeout(240)
@pytest.mark.parametrize("p", [1, 2, 3, 4], ids=lambda p: f"P{p}")
def test_gated_delta_attention_matches_recurrence_and_bytes(p):
    counts = assert_no_failures(run_distributed(_cp_worker, p, timeout=200, reuse=True))
    assert all(n == 10 * 6 for n in counts)


def _error_cases():
    q, k = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    v, beta, g = torch.randn(1, 8, 2, 6), torch.rand(1, 8, 2), -torch.rand(1, 8, 2)
    return [
        ("not_4d", "4-D", dict(q=torch.randn(8, 2, 4))),
        ("dk_mismatch", "head_dim", dict(k=torch.randn(1, 8, 2, 5))),
        ("heads", "same number of heads", dict(k=torch.randn(1, 8, 1, 4), v=torch.randn(1, 8, 1, 6))),
        ("beta_shape", "beta a floating tensor", dict(beta=torch.rand(1, 8, 3))),
        ("beta_range", "beta in [0, 1]", dict(beta=beta + 1.5)),
        ("beta_nan", "beta in [0, 1]", dict(beta=torch.full_like(beta, float("nan")))),
        ("g_positive", "g <= 0", dict(g=-g)),
        ("g_dtype", "g a floating tensor", dict(g=torch.zeros(1, 8, 2, dtype=torch.long))),
        ("layout", "expected one of", dict(layout="ring")),
        ("seq_len", "divisible by 2", dict(q=q[:, :5], k=k[:, :5], v=v[:, :5], beta=beta[:, :5], g=g[:, :5])),
        ("cu_end", "end at the global sequence length S=8", dict(cu_seqlens=torch.tensor([0, 3, 7]))),
        ("cu_order", "never decreasing", dict(cu_seqlens=torch.tensor([0, 5, 3, 8]))),
        ("cu_float", "int32/int64", dict(cu_seqlens=torch.tensor([0.0, 8.0]))),
        ("kernel", "DeltaKernel", dict(local_kernel=42)),
        ("scale", "scale", dict(scale="0.5")),
    ], dict(q=q, k=k, v=v, beta=beta, g=g)


def _errors():
    cases, base = _error_cases()

    def call(**over):
        kw = {**base, **over}
        gated_delta_attention(*[kw.pop(n) for n in ("q", "k", "v", "beta", "g")], group=None, **kw)
    return value_error_report(call, cases)

