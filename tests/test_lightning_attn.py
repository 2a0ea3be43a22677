"""Lightning attention kernels (Triton under the interpreter, and torch) against fp64 references.

Every case checks out, final_state and dq, dk, dv, dinitial_state of a loss that uses both out and
final_state, against the chunked naive reference run in fp64 with chunk 16 (so its chunk boundaries
differ from the kernels' 64). Sequence lengths are 1, 63, 100, 200 (partial last chunks), Dk != Dv,
head dims that are not powers of two (24, 40, 48, 96: masked padding; Dv = 96 also spans two Dv-blocks
in Triton), batch 2.
"""
import pytest
import torch

from dist_attn.kernels.lightning_attn import lightning_attn, linear_kernel
from dist_attn.kernels.lightning_attn.naive import linear_attn_chunked
from tests.utils import assert_close

B, H = 2, 2
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _inputs(s, dk, dv, dtype, decay, init, g=None):
    q, k = (torch.randn(B, s, H, dk).to(dtype) for _ in range(2))
    v = torch.randn(B, s, H, dv).to(dtype)
    if decay:
        g = -0.01 - 0.3 * torch.rand(H) if g is None else torch.full((H,), float(g))
    else:
        g = None
    s0 = torch.randn(B, H, dk, dv, dtype=torch.promote_types(dtype, F32)) if init else None
    # upstream gradients representable in dtype, so the kernel and the reference see the same ones
    wo = torch.randn(B, s, H, dv).to(dtype).double()
    ws = torch.randn(B, H, dk, dv).double()
    return q, k, v, g, s0, wo, ws


def _run(fn, q, k, v, g, s0, wo, ws, wdtype=None):
    """Forward + backward of loss = <out, wo> + <final_state, ws>; returns (out, state, grads)."""
    leaves = [t.detach().clone().to(wdtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    s0l = None if s0 is None else s0.detach().clone().to(wdtype or s0.dtype).requires_grad_(True)
    decay = None if g is None else g.to(wdtype or g.dtype)
    out, state = fn(*leaves, decay=decay, initial_state=s0l)
    loss = (out.double() * wo).sum() + (state.double() * ws).sum()
    grads = torch.autograd.grad(loss, leaves + ([s0l] if s0l is not None else []))
    return out, state, grads


def _reference(q, k, v, g, s0, wo, ws):
    def ref(q, k, v, *, decay, initial_state):
        return linear_attn_chunked(q, k, v, decay=decay, initial_state=initial_state, chunk_size=16)
    return _run(ref, q, k, v, g, s0, wo, ws, wdtype=F64)


def _check_against_reference(backend, s, dk, dv, dtype, decay, init, g=None):
    q, k, v, g, s0, wo, ws = _inputs(s, dk, dv, dtype, decay, init, g)
    r_out, r_state, r_grads = _reference(q, k, v, g, s0, wo, ws)
    out, state, grads = _run(linear_kernel(backend), q, k, v, g, s0, wo, ws)
    assert out.dtype == dtype and state.dtype == torch.promote_types(dtype, F32)
    assert_close("out", r_out, out, dtype)
    assert_close("final_state", r_state, state, dtype)
    for name, r, x in zip(("dq", "dk", "dv", "dinitial_state"), r_grads, grads):
        assert x.dtype == (s0.dtype if name == "dinitial_state" else dtype), name
        assert_close(name, r, x, dtype)


def _id(case):
    s, dk, dv, dtype, decay, init = case
    tags = ("decay" if decay else "nodecay", "init" if init else "noinit")
    return f"S{s}-Dk{dk}-Dv{dv}-{str(dtype)[6:]}-{tags[0]}-{tags[1]}"


# (S, Dk, Dv, dtype, decay, initial_state): representative combos, the interpreter is slow
TRITON_CASES = [
    (1, 16, 32, F32, True, True),
    (63, 32, 48, F32, False, False),
    (100, 48, 96, F32, True, True),
    (200, 16, 24, F32, True, False),
    (100, 32, 16, F16, False, True),
    (200, 48, 32, F16, True, True),
    (1, 16, 16, BF16, False, False),
    (63, 32, 48, BF16, True, True),
    (200, 24, 40, BF16, False, True),
    (130, 64, 96, BF16, True, False),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[_id(c) for c in TRITON_CASES])
def test_triton_matches_reference(case):
    _check_against_reference("triton", *case)


TORCH_CASES = [(s, 24, 40, dt, dec, init) for s in (1, 63, 128, 200) for dt in (F64, F32, BF16)
               for dec in (False, True) for init in (False, True)] + \
    [(100, 48, 96, F16, True, True), (100, 32, 16, F16, False, False)]


@pytest.mark.parametrize("case", TORCH_CASES, ids=[_id(c) for c in TORCH_CASES])
def test_torch_matches_reference(case):
    _check_against_reference("torch", *case)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strong_decay_partial_chunk_no_overflow(backend):
    """g = -30: lambda^(L-1-j) on the padded rows of the last chunk would overflow if not masked."""
    _check_against_reference(backend, 100, 16, 24, F32, True, True, g=-30.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_functional_contract_without_state(backend):
    """fwd/bwd directly: dfinal_state None, initial_state None -> dinitial_state None; explicit scale."""
    q, k, v, g, _, wo, _ = _inputs(100, 16, 24, F32, True, False)
    kern = linear_kernel(backend)
    out, state = kern.fwd(q, k, v, decay=g, initial_state=None, scale=0.3)
    dq, dk, dv, dinit, dg = kern.bwd(wo.float(), None, q, k, v, decay=g, initial_state=None, scale=0.3)
    assert dinit is None and dg is None

    def ref(q, k, v, *, decay, initial_state):
        return linear_attn_chunked(q, k, v, decay=decay, initial_state=initial_state, scale=0.3)
    r_out, r_state, r_grads = _run(ref, q, k, v, g, None, wo, torch.zeros(B, H, 16, 24, dtype=F64),
                                   wdtype=F64)
    for name, r, x in zip(("out", "state", "dq", "dk", "dv"), (r_out, r_state) + r_grads,
                          (out, state, dq, dk, dv)):
        assert_close(name, r, x)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_two_segments_equal_one(backend):
    """Feeding the final state of the first half as the initial state of the second (what LASP-2
    does across ranks) gives the full-sequence outputs and gradients, with gradients crossing the
    state hand-off."""
    s, cut = 150, 70
    q, k, v, g, s0, wo, ws = _inputs(s, 16, 24, F32, True, True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]
    qa, ka, va, s0a = leaves
    o1, st1 = lightning_attn(qa[:, :cut], ka[:, :cut], va[:, :cut], decay=g, initial_state=s0a,
                             output_final_state=True, backend=backend)
    o2, st2 = lightning_attn(qa[:, cut:], ka[:, cut:], va[:, cut:], decay=g, initial_state=st1,
                             output_final_state=True, backend=backend)
    loss = (torch.cat([o1, o2], 1).double() * wo).sum() + (st2.double() * ws).sum()
    grads = torch.autograd.grad(loss, leaves)
    r_out, r_state, r_grads = _reference(q, k, v, g, s0, wo, ws)
    assert_close("out", r_out, torch.cat([o1, o2], 1))
    assert_close("final_state", r_state, st2)
    for name, r, x in zip(("dq", "dk", "dv", "dinitial_state"), r_grads, grads):
        assert_close(name, r, x)


def test_public_api_auto_and_final_state_gradient():
    q, k, v, g, s0, _, _ = _inputs(70, 16, 24, F32, True, True)
    out, none = lightning_attn(q, k, v, decay=g)
    assert none is None
    out_t, _ = linear_kernel("torch")(q, k, v, decay=g)
    assert torch.equal(out, out_t)  # auto on CPU is the torch backend
    # a loss on final_state alone: gradients reach k, v, initial_state but not q
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]
    _, state = lightning_attn(*leaves[:3], decay=g, initial_state=leaves[3], output_final_state=True)
    dq, dk, dv, ds0 = torch.autograd.grad(state.pow(2).sum(), leaves)
    assert torch.count_nonzero(dq) == 0
    assert all(torch.count_nonzero(t) > 0 for t in (dk, dv, ds0))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_fla_simple_gla(backend):
    """Cross-check with flash-linear-attention's plain-torch simple GLA recurrence, whose gate g is a
    per-token log-decay [B, T, H] and whose q is scaled by scale (default K**-0.5), like ours."""
    pytest.importorskip("fla")
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    q, k, v, g, s0, wo, ws = _inputs(100, 32, 48, F32, True, True)

    def fla_ref(q, k, v, *, decay, initial_state):
        gate = decay.view(1, 1, H).expand(B, q.shape[1], H).contiguous()
        return naive_recurrent_simple_gla(q, k, v, gate, initial_state=initial_state,
                                          output_final_state=True)
    f_out, f_state, f_grads = _run(fla_ref, q, k, v, g, s0, wo, ws)
    out, state, grads = _run(linear_kernel(backend), q, k, v, g, s0, wo, ws)
    for name, r, x in zip(("out", "final_state", "dq", "dk", "dv", "dinitial_state"),
                          (f_out, f_state) + f_grads, (out, state) + grads):
        assert_close(name, r, x, F32, scale=2.0)  # both sides fp32: allow the sum of two errors


def _bad(**over):
    """Valid fp32 inputs (B=2, S=5, H=2, Dk=8, Dv=4) with some fields replaced."""
    args = dict(q=torch.randn(2, 5, 2, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 4),
                decay=-torch.rand(2), initial_state=torch.zeros(2, 2, 8, 4))
    args.update(over)
    return args


BAD = {
    "q-3d": (_bad(q=torch.randn(2, 5, 8)), "4-D"),
    "batch-mismatch": (_bad(k=torch.randn(1, 5, 2, 8)), "same \\[B, S, H\\]"),
    "seq-mismatch": (_bad(v=torch.randn(2, 6, 2, 4)), "same \\[B, S, H\\]"),
    "heads-mismatch": (_bad(k=torch.randn(2, 5, 1, 8)), "same \\[B, S, H\\]"),
    "dk-mismatch": (_bad(k=torch.randn(2, 5, 2, 6)), "same head dim Dk"),
    "positive-decay": (_bad(decay=torch.tensor([-0.1, 0.2])), "g <= 0"),
    "nonfinite-decay": (_bad(decay=torch.tensor([-float("inf"), -0.1])), "g <= 0"),
    "decay-shape": (_bad(decay=-torch.rand(2, 1)), "shape \\[H\\]"),
    "state-shape": (_bad(initial_state=torch.zeros(2, 2, 4, 8)), "initial_state expected"),
    "int-dtype": (_bad(q=torch.ones(2, 5, 2, 8, dtype=torch.int64)), "dtype"),
    "mixed-dtype": (_bad(v=torch.randn(2, 5, 2, 4, dtype=F16)), "dtype"),
    "devices": (_bad(decay=-torch.rand(2, device="meta")), "one device"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(BAD))
def test_value_errors(backend, name):
    args, match = BAD[name]
    with pytest.raises(ValueError, match=match) as err:
        linear_kernel(backend).fwd(**args, scale=None)
    assert "expected" in str(err.value) and "got" in str(err.value) and "Fix:" in str(err.value)


def test_value_errors_backend_specific():
    args = _bad(q=torch.randn(2, 5, 2, 8, dtype=F64), k=torch.randn(2, 5, 2, 8, dtype=F64),
                v=torch.randn(2, 5, 2, 4, dtype=F64))
    with pytest.raises(ValueError, match="dtype"):
        linear_kernel("triton").fwd(**args, scale=None)  # Triton: fp32/fp16/bf16 only
    linear_kernel("torch").fwd(**args, scale=None)  # torch also takes fp64
    with pytest.raises(ValueError, match="backend expected"):
        linear_kernel("cuda")

