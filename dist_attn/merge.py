"""Online-softmax merge of partial attention results over disjoint key sets, in fp32.

Two partial results of the *same* queries over disjoint keys K1, K2 (``o [B, S, H, D]``,
``lse [B, H, S]``, lse_i = log sum_{j in K_i} exp(s_ij)) combine exactly into the result over K1 ∪ K2:

    lse = log(exp(lse1) + exp(lse2))
    o   = exp(lse1 - lse)·o1 + exp(lse2 - lse)·o2

Written in the stable form (no exp of a large number, no cancellation of two large lse)::

    w   = exp(lse2 - lse) = sigmoid(lse2 - lse1)
    o   = o1 - w·(o1 - o2)
    lse = lse1 - logsigmoid(lse1 - lse2) = max(lse1, lse2) + softplus(-|lse1 - lse2|)

The last equality is the form computed: it stays finite when exactly one side is -inf (a block in
which a query saw no key), where ``lse1 - logsigmoid(lse1 - lse2)`` would read ``-inf - (-inf)``.
A row with lse = -inf on *both* sides saw no key at all: it gets o = 0, lse = -inf and no NaN.

Everything is done in fp32 (or fp64 if the inputs are fp64): merging bf16 block outputs loses a
roundoff per ring step, which is the drift reported for ring sizes 4-8 in other implementations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def merge_attn(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (o1, lse1) and (o2, lse2) of the same queries over disjoint keys.

    o1, o2 ``[B, S, H, D]`` (any float dtype), lse1, lse2 ``[B, H, S]``.
    Returns ``(o [B, S, H, D], lse [B, H, S])`` in fp32 (fp64 if an input is fp64). Differentiable.
    """
    acc = torch.promote_types(_acc_dtype(o1), _acc_dtype(lse1))
    o1, o2, lse1, lse2 = o1.to(acc), o2.to(acc), lse1.to(acc), lse2.to(acc)
    both_empty = (lse1 == float("-inf")) & (lse2 == float("-inf"))  # [B, H, S]
    # -inf - (-inf) is NaN: route the empty rows through a harmless 0 and fix them at the end
    zero = torch.zeros_like(lse1)
    d = torch.where(both_empty, zero, lse2 - lse1)                     # [B, H, S]
    w = torch.sigmoid(d).transpose(1, 2).unsqueeze(-1)                 # [B, S, H, 1]
    o = o1 - w * (o1 - o2)
    hi = torch.where(both_empty, zero, torch.maximum(lse1, lse2))
    lse = hi + F.softplus(-d.abs())
    lse = torch.where(both_empty, torch.full_like(lse, float("-inf")), lse)
    o = torch.where(both_empty.transpose(1, 2).unsqueeze(-1), torch.zeros_like(o), o)
    return o, lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
               q_slice: slice = slice(None)) -> None:
    """In place: merge a block's ``(block_out, block_lse)`` into the running ``(out, lse)``.

    ``out`` fp32 ``[B, S, H, D]`` and ``lse`` fp32 ``[B, H, S]`` are the accumulators of all local
    queries; the block covers the queries ``q_slice`` of them: block_out ``[B, S_q, H, D]``,
    block_lse ``[B, H, S_q]``. Start the accumulators at ``out = 0, lse = -inf`` (see
    :func:`empty_accumulators`): merging into an empty row returns the block itself.
    """
    assert out.dtype == lse.dtype and out.dtype in (torch.float32, torch.float64), "accumulators are fp32/fp64"
    o_view, l_view = out[:, q_slice], lse[:, :, q_slice]
    o_new, l_new = merge_attn(o_view, l_view, block_out, block_lse)
    o_view.copy_(o_new)
    l_view.copy_(l_new)


def empty_accumulators(q: torch.Tensor, v_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(out = 0 [B, S, H, Dv], lse = -inf [B, H, S])`` for queries ``q [B, S, H, D]``."""
    b, s, h, d = q.shape
    acc = _acc_dtype(q)
    out = torch.zeros(b, s, h, d if v_dim is None else v_dim, dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    return out, lse


class BlockwiseAttention(torch.autograd.Function):
    """Autograd wrapper shared by the blockwise softmax-CP strategies (ring, all-gather, each with and
    without a mask): ``apply(q, k, v, fwd, bwd, args)`` runs ``fwd(q, k, v, *args) -> (out, lse)``, saves
    q, k, v, out, lse (O(S/P) per rank), and in backward ``bwd(dout, q, k, v, out, lse, *args)`` returns
    fp32 dq, dk, dv, cast back to the input dtypes. ``args`` holds only non-differentiable values."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, args):
        out, lse = fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bwd, ctx.args = bwd, args
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
