"""Shared helpers for the Ulysses and USP tests: tensors, fp64 references, the sharded runner, the
comparison that collects failures by name, and the closed-form all-to-all bytes. Used by
``tests/test_ulysses.py`` and ``tests/test_usp.py``."""
from __future__ import annotations

import torch

from tests.utils import assert_close

# P -> (query heads, KV-head options): MHA, GQA with Hkv >= P, and Hkv < P (replicated KV, incl. MQA)
HEADS = {1: (4, (4, 2, 1)), 2: (4, (4, 2, 1)), 3: (6, (6, 3, 1)), 4: (8, (8, 4, 2, 1))}
CHUNK = 5  # tokens per zigzag chunk: S = 2P·5, an awkward length


def make_tensors(seed, shapes, dtype):
    """Global fp64 tensors rounded to ``dtype`` (so the reference sees exactly the tested inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def softmax_ref(q, k, v, dout, causal, scale=None):
    """fp64 output and input gradients of plain softmax attention on the global tensors."""
    from dist_attn.kernels.flash_attn.naive import attention_ref
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out, _ = attention_ref(*leaves, causal=causal, softmax_scale=scale)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def linear_ref(q, k, v, dout, decay, scale=None):
    """fp64 output and gradients of the step-by-step causal linear recurrence (independent of the chunked op)."""
    from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    dec = None if decay is None else decay.double()
    out, _ = linear_attn_recurrent(*leaves, decay=dec, scale=scale)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def run_sharded(fn, tensors, dout, rank, p, layout, **kw):
    """Shard global tensors, run ``fn`` with recorders around forward and backward; return
    (out, dq, dk, dv, forward recorder, backward recorder), all local."""
    from dist_attn.comm import CommRecorder
    from dist_attn.layout import shard
    local = [shard(t, rank, p, layout).requires_grad_(True) for t in tensors]
    with CommRecorder() as rec_f:
        out = fn(*local, layout=layout, **kw)
    with CommRecorder() as rec_b:
        out.backward(shard(dout, rank, p, layout))
    return [out.detach()] + [t.grad for t in local] + [rec_f, rec_b]


def compare(failures, tag, names, refs, outs, rank, p, layout, dtype):
    from dist_attn.layout import shard
    for name, ref, out in zip(names, refs, outs):
        try:
            assert_close(f"{tag} {name}", shard(ref, rank, p, layout), out, dtype=dtype)
        except AssertionError as e:
            failures.append(str(e))


def ulysses_bytes(p, b, n, hq, hkv, d, dv, elem):
    """Closed form, bytes sent per rank per direction: (P-1)/P²·B·N·b·(Hq·D + Hkv'·D + Hkv'·Dv + Hq·Dv)."""
    hkv = max(hkv, p)  # KV heads replicated up to P when Hkv < P
    num = (p - 1) * b * n * elem * (hq * d + hkv * d + hkv * dv + hq * dv)
    assert num % (p * p) == 0
    return num // (p * p)


def check_bytes(failures, tag, rec_f, rec_b, expected, p):
    for direction, rec in (("forward", rec_f), ("backward", rec_b)):
        kinds = {k for k, v in rec.calls.items() if v}
        if p > 1 and (kinds != {"all_to_all"} or rec.sent["all_to_all"] != expected
                      or rec.recv["all_to_all"] != expected or rec.calls["all_to_all"] != 2):
            failures.append(f"{tag} {direction}: sent {dict(rec.sent)} in {dict(rec.calls)} calls, "
                            f"expected {expected} all_to_all bytes in 2 calls")
        if p == 1 and rec.total_sent != 0:
            failures.append(f"{tag} {direction}: P=1 must not communicate, sent {dict(rec.sent)}")
