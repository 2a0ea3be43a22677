"""Ulysses attention on gloo CPU processes vs the single-process fp64 references, DeepSpeed's Ulysses,
and the closed-form byte count. Each launch runs many configurations; a failing one is reported by name
with every other failure of the same launch."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from tests.dist import RankError, run_distributed
from tests.ulysses_runner import (CHUNK, HEADS, check_bytes, compare, linear_ref, make_tensors,  # noqa: F401
                                  run_sharded, softmax_ref, ulysses_bytes)

def _correctness(rank, p):
    from dist_attn.context import CPContext
    from dist_attn.dispatch import linear_attention, softmax_attention
    from dist_attn.ulysses import ulysses_attention
    from dist_attn.kernels.lightning_attn import linear_kernel

    failures, n_checked = [], 0
    hq, hkv_opts = HEADS[p]
    n = 2 * p * CHUNK
    combos = itertools.product(hkv_opts, ("zigzag", "contiguous"), (True, False), (torch.float32, torch.bfloat16))
    for i, (hkv, layout, causal, dtype) in enumerate(combos):
        b, d = (2, 64) if i % 2 else (1, 96)
        tag = f"softmax P={p} Hq={hq} Hkv={hkv} {layout} causal={causal} {dtype} B={b} D={d}"
        q, k, v, dout = make_tensors(i, [(b, n, hq, d), (b, n, hkv, d), (b, n, hkv, d), (b, n, hq, d)], dtype)
        scale = 0.3 if i % 5 == 0 else None
        refs = softmax_ref(q, k, v, dout, causal, scale)
        *outs, rec_f, rec_b = run_sharded(ulysses_attention, (q, k, v), dout, rank, p, layout, group=None,
                                          causal=causal, softmax_scale=scale)
        compare(failures, tag, ("out", "dq", "dk", "dv"), refs, outs, rank, p, layout, dtype)
        check_bytes(failures, tag, rec_f, rec_b,
                    ulysses_bytes(p, b, n, hq, hkv, d, d, q.element_size()), p)
        n_checked += 1

    # linear local op (always causal), Dv != Dk, with and without decay
    kernel, h, dk, dv = linear_kernel("auto"), hq, 32, 48
    for i, (layout, use_decay, dtype) in enumerate(itertools.product(("zigzag", "contiguous"), (True, False),
                                                                      (torch.float32, torch.bfloat16))):
        b = 2 if i % 2 else 1
        tag = f"linear P={p} H={h} {layout} decay={use_decay} {dtype} B={b}"
        q, k, v, dout = make_tensors(100 + i, [(b, n, h, dk), (b, n, h, dk), (b, n, h, dv), (b, n, h, dv)], dtype)
        decay = -torch.linspace(0.05, 0.6, h) if use_decay else None
        refs = linear_ref(q, k, v, dout, decay)
        *outs, rec_f, rec_b = run_sharded(ulysses_attention, (q, k, v), dout, rank, p, layout, group=None,
                                          local_attn=kernel, decay=decay)
        compare(failures, tag, ("out", "dq", "dk", "dv"), refs, outs, rank, p, layout, dtype)
        check_bytes(failures, tag, rec_f, rec_b, ulysses_bytes(p, b, n, h, h, dk, dv, q.element_size()), p)
        n_checked += 1

    # through the model-facing dispatch, for both layer types
    import torch.distributed as dist
    for layout in ("zigzag", "contiguous"):
        cp = CPContext(group=dist.group.WORLD, layout=layout, softmax_strategy="ulysses", linear_strategy="ulysses")
        q, k, v, dout = make_tensors(7, [(1, n, hq, 64), (1, n, hkv_opts[-1], 64), (1, n, hkv_opts[-1], 64),
                                         (1, n, hq, 64)], torch.float32)
        refs = softmax_ref(q, k, v, dout, True)
        *outs, _, _ = run_sharded(lambda *t, layout: softmax_attention(*t, cp=cp), (q, k, v), dout, rank, p, layout)
        compare(failures, f"dispatch softmax {layout}", ("out", "dq", "dk", "dv"), refs, outs, rank, p, layout,
                torch.float32)
        decay = -torch.linspace(0.1, 0.9, hq)  # identical on every rank
        q, k, v, dout = make_tensors(8, [(1, n, hq, 16)] * 4, torch.float32)
        refs = linear_ref(q, k, v, dout, decay)
        *outs, _, _ = run_sharded(lambda *t, layout: linear_attention(*t, cp=cp, decay=decay), (q, k, v), dout,
                                  rank, p, layout)
        compare(failures, f"dispatch linear {layout}", ("out", "dq", "dk", "dv"), refs, outs, rank, p, layout,
                torch.float32)
        n_checked += 2
    return failures, n_checked


def _deepspeed(rank, p):
    import deepspeed.comm as ds_comm
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from dist_attn.layout import gathered_to_global_index
    from dist_attn.ulysses import ulysses_attention
    from dist_attn.kernels.flash_attn.naive import attention_ref

    ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    diffs = []
    for i, (layout, causal, hkv) in enumerate(itertools.product(("zigzag", "contiguous"), (True, False), (p, 2 * p))):
        n, hq, d = 2 * p * CHUNK, 2 * p, 32
        gidx = gathered_to_global_index(n, p, layout)

        def local_attention(q, k, v):
            # DeepSpeed hands the local op [B, S, H/P, D] in rank order of the shards: put the tokens in
            # global order for the causal mask, and back afterwards.
            out, _ = attention_ref(q[:, gidx], k[:, gidx], v[:, gidx], causal=causal)
            return out[:, torch.argsort(gidx)]

        ds_attn = DistributedAttention(local_attention, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        q, k, v, dout = make_tensors(200 + i, [(2, n, hq, d), (2, n, hkv, d), (2, n, hkv, d), (2, n, hq, d)],
                                     torch.float32)
        ours = run_sharded(ulysses_attention, (q, k, v), dout, rank, p, layout, causal=causal)[:4]
        theirs = run_sharded(lambda *t, layout: ds_attn(*t, batch_dim_idx=0), (q, k, v), dout, rank, p, layout)[:4]
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
            diffs.append((f"{layout} causal={causal} Hkv={hkv} {name}", (a - b).abs().max().item(),
                          b.abs().max().item()))
    return diffs


def _error_cases(n):
    """(name, kwargs for ulysses_attention, expected message fragment); P=4, a valid base of n local tokens."""
    from dist_attn.kernels.lightning_attn import linear_kernel
    f32 = torch.float32

    def qkv(hq=8, hkv=8, s=n, d=16, dtype=f32, **over):
        t = {"q": torch.randn(2, s, hq, d, dtype=dtype), "k": torch.randn(2, s, hkv, d, dtype=dtype),
             "v": torch.randn(2, s, hkv, d, dtype=dtype)}
        t.update(over)
        return t

    lin = linear_kernel("auto")
    return [
        ("Hq % P", qkv(hq=6, hkv=6), "query heads (Hq) divisible by the Ulysses degree"),
        ("Hkv % P", qkv(hq=12, hkv=6), "KV heads (Hkv) divisible by the Ulysses degree"),
        ("P % Hkv", qkv(hq=12, hkv=3), "KV heads can be replicated evenly"),
        ("zigzag length", qkv(s=3), "divisible by 8"),
        ("layout", dict(qkv(), layout="ring"), "expected one of"),
        ("dtype mix", qkv(k=torch.randn(2, n, 8, 16, dtype=torch.bfloat16)), "one dtype"),
        ("int dtype", qkv(q=torch.ones(2, n, 8, 16, dtype=torch.int32)), "fp16/bf16/fp32/fp64"),
        ("3-D q", qkv(q=torch.randn(2, n, 128)), "4-D"),
        ("batch", qkv(k=torch.randn(3, n, 8, 16)), "batch 2"),
        ("head dim", qkv(k=torch.randn(2, n, 8, 8)), "head_dim"),
        ("local_attn", dict(qkv(), local_attn=lambda *a, **k: a[0]), "SoftmaxKernel or LinearKernel"),
        ("decay+softmax", dict(qkv(), decay=-torch.rand(8)), "decay=None with a SoftmaxKernel"),
        ("decay shape", dict(qkv(), local_attn=lin, decay=-torch.rand(9)), "shape [H]=[8]"),
        ("decay > 0", dict(qkv(), local_attn=lin, decay=torch.rand(8) + 0.1), "decay <= 0"),
        ("linear heads", dict(qkv(hq=8, hkv=4), local_attn=lin), "as many key/value heads"),
        ("linear full", dict(qkv(), local_attn=lin, causal=False), "causal=True with a LinearKernel"),
        ("scale", dict(qkv(), softmax_scale=-1.0), "positive number"),
        ("causal type", dict(qkv(), causal="yes"), "causal to be a bool"),
    ]


def _errors(rank, p):
    from dist_attn.ulysses import ulysses_attention
    torch.manual_seed(0)  # same bad inputs on every rank
    got = []
    for name, kw, _ in _error_cases(4):
        try:
            ulysses_attention(**kw)
            got.append((name, "no error", ""))
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            got.append((name, type(e).__name__, str(e)))
    # the ranks are still aligned after all the refusals: a valid call completes everywhere
    q = torch.randn(1, 4, 8, 32)
    out = ulysses_attention(q, q, q)
    return got, bool(torch.isfinite(out).all())


def _launch_worker(rank, p):
    """One launch per P (process start-up dominates on CPU): every check of that P, results returned."""
    out = {"reference": _correctness(rank, p)}
    if p == 2:
        out["deepspeed"] = _deepspeed(rank, p)
    if p == 4:
        out["errors"] = _errors(rank, p)
    return out


@functools.lru_cache(maxsize=None)
def _launch(p):
    return run_distributed(_launch_worker, p, timeout=300, reuse=p != 2)  # P=2 runs DeepSpeed


@pytest.mark.parametrize("p", [1, 2, 3, 4], ids=lambda p: f"P{p}")
def test_ulysses_matches_reference(p):
    results = [r["reference"] for r in _launch(p)]
    failures = [f for fails, _ in results for f in fails]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:30])
    assert all(n >= 20 for _, n in results)


def test_ulysses_matches_deepspeed():
    pytest.importorskip("deepspeed")
    for r in _launch(2):
        diffs = r["deepspeed"]
        assert len(diffs) == 32
        for name, err, size in diffs:
            assert size > 0 and err <= 1e-5 * size, f"ours vs DeepSpeed {name}: max diff {err:.3e} (scale {size:.3e})"


def test_ulysses_errors_raise_on_every_rank():
    expected = [(name, frag) for name, _, frag in _error_cases(4)]
    for rank, r in enumerate(_launch(4)):
        got, ok = r["errors"]
        assert ok, f"rank {rank}: valid call after the errors failed"
        assert len(got) == len(expected)
        for (name, frag), (gname, typ, msg) in zip(expected, got):
            assert gname == name and typ == "ValueError", f"rank {rank} {name}: raised {typ}: {msg}"
            assert frag in msg and "Fix:" in msg, f"rank {rank} {name}: message lacks {frag!r}: {msg}"


def _uncaught_worker(rank, p):
    from dist_attn.ulysses import ulysses_attention
    q = torch.randn(1, 4, 3, 8)  # 3 heads over P=2
    return ulysses_attention(q, q, q)


def test_ulysses_error_uncaught_is_valueerror_everywhere():
    results = run_distributed(_uncaught_worker, 2, timeout=60, raise_errors=False, reuse=True)
    for r in results:
        assert isinstance(r, RankError) and r.type_name == "ValueError", r
        assert "Hq=3" in r.message and "Fix:" in r.message
