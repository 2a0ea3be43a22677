"""The chunk-parallel Triton lightning kernel against the fp64 step-by-step recurrence.

Every case checks out, final_state and every gradient (q, k, v, initial_state, g) with gradients
flowing into both out and final_state. Tiny awkward shapes (Triton interpreter on CPU, the real
compiler on a GPU): sequences that are not multiples of the 64-token chunk, Dk != Dv, Dv spanning a
partial second 64-column block, documents starting on and off chunk boundaries, an empty document,
a one-token document, gates strong enough to underflow.
"""
from __future__ import annotations

import pytest
import torch

from dist_attn.kernels.lightning_attn import lightning_attn
from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
from tests.utils import assert_close

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16 = torch.float32, torch.bfloat16

CASES = {  # id: (B, S, H, Dk, Dv, dtype, decay, init, dfinal, gate, cu_seqlens)
    "decay-state-s150-dk16-dv24-fp32": (2, 150, 2, 16, 24, F32, [-1.0, 0.0], True, True, None, None),
    "nodecay-s63-dk32-dv80-bf16": (1, 63, 2, 32, 80, BF16, None, False, False, None, None),
    "gate-docs-s150-fp32": (1, 150, 2, 16, 24, F32, [-0.3, -0.01], True, True, 0.5, [0, 40, 64, 64, 65, 130, 150]),
    "gate-docs-nodfinal-s129-bf16": (2, 129, 2, 16, 16, BF16, None, True, False, 0.2, [0, 1, 64, 129]),
    "strong-gate-s70-fp32": (1, 70, 2, 16, 16, F32, [-20.0, -0.5], False, True, 30.0, None),
}


def _inputs(case):
    b, s, h, dk, dv, dtype, decay, init, dfinal, gate, cu = case
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(b, s, h, dk, generator=gen).to(dtype) for _ in range(2))
    v, dout = (torch.randn(b, s, h, dv, generator=gen).to(dtype) for _ in range(2))
    s0 = torch.randn(b, h, dk, dv, generator=gen) if init else None
    dfin = torch.randn(b, h, dk, dv, generator=gen) if dfinal else None
    g = -torch.rand(b, s, h, generator=gen) * gate if gate else None
    dec = torch.tensor(decay) if decay is not None else None
    cu = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    return q, k, v, dout, s0, dfin, g, dec, cu


def _run(fn, q, k, v, dout, s0, dfin, g, dec, cu, device, acc):
    leaves = {name: t.to(device=device, dtype=acc if acc is not None and name not in ("q", "k", "v") else
                         (acc or t.dtype)).requires_grad_(True)
              for name, t in (("q", q), ("k", k), ("v", v), ("initial_state", s0), ("g", g)) if t is not None}
    out, fin = fn(leaves["q"], leaves["k"], leaves["v"], decay=None if dec is None else dec.to(device, acc or torch.float32),
                  initial_state=leaves.get("initial_state"), g=leaves.get("g"),
                  cu_seqlens=None if cu is None else cu.to(device))
    outs, grads = [out], [dout.to(device, out.dtype)]
    if dfin is not None:
        outs.append(fin)
        grads.append(dfin.to(device, fin.dtype))
    torch.autograd.backward(outs, grads)
    return out, fin, {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_lightning_matches_fp64_recurrence(case_id):
    case = CASES[case_id]
    dtype = case[5]
    args = _inputs(case)
    o_ref, f_ref, g_ref = _run(linear_attn_recurrent, *args, "cpu", torch.float64)

    def triton_fn(q, k, v, **kw):
        return lightning_attn(q, k, v, output_final_state=True, backend="triton", **kw)
    out, fin, grads = _run(triton_fn, *args, DEV, None)
    assert out.dtype == dtype and fin.dtype == torch.float32
    assert_close("out", o_ref, out, dtype)
    assert_close("final_state", f_ref, fin, dtype)
    for name, ref in g_ref.items():
        # dg = sum over a document of (q.dq - k.dk): a difference of terms much larger than dg itself
        # under strong gates, so its relative error is a few times that of dq/dk
        assert_close(f"d{name}", ref, grads[name], dtype, scale=5.0 if name == "g" else 1.0)


def test_triton_lightning_empty_sequence_passes_the_state_through():
    q = torch.zeros(1, 0, 2, 16, device=DEV)
    s0 = torch.randn(1, 2, 16, 16, device=DEV)
    out, fin = lightning_attn(q, q, q, initial_state=s0, output_final_state=True, backend="triton")
    assert out.shape == (1, 0, 2, 16) and torch.equal(fin, s0)
