"""Documents and windows in the kernel sweep (``benchmarks/kernels.py``), and the ``auto`` table.

A masked point is causal with packed documents (``docs``: a seeded long-tailed mix, log-normal
lengths with median S/16) or with the same documents and a left window (``window``: W = min(1024,
S/4)). Every op sees the same rule: ours and torch's op through ours take ``cu_seqlens`` /
``window_size``; SDPA takes it as a boolean ``attn_mask`` [S, S] (S <= 16K); FlexAttention as a
block mask from the equivalent ``mask_mod``. FLOPs count the visible pairs only (interval form of
:mod:`dist_attn.kernels.flash_attn.masks`): forward 4·B·H·D·pairs, bwd 2.5x, fwd+bwd 3.5x.

On a GPU the sweep merges its winners into ``sdpa_select_<gpu>.json`` (:func:`write_select_table`):
per (mask class, D, dtype, S) the faster of ``flash_attn`` (ours) and ``sdpa_kernel`` (torch's flash
op) at fwd+bwd, which ``softmax_kernel("auto")`` reads.
"""
from __future__ import annotations

import json
import os

import torch

MASKED_OPS = ("flash_attn", "sdpa_kernel", "sdpa", "sdpa_efficient", "sdpa_cudnn", "flex")
SDPA_MASK_MAX_S = 16384  # a boolean [S, S] mask: 256 MB at 16K


def masked_flops(b, h, d, pairs, mode) -> float:
    return 4.0 * b * h * d * pairs * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def bench_documents(s: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens`` int32 [0, ..., S] of a seeded long-tailed document mix (log-normal lengths with
    median S/16, at least 1 token; the last document is cut at S): many short, a few long ones."""
    gen = torch.Generator().manual_seed(seed)
    cuts, pos = [0], 0
    while pos < s:
        n = int(torch.empty(1).log_normal_(mean=0.0, std=1.0, generator=gen).item() * s / 16) + 1
        pos = min(s, pos + n)
        cuts.append(pos)
    return torch.tensor(cuts, dtype=torch.int32)


def bench_window(s: int) -> int:
    return min(1024, s // 4)


def mask_spec(mask, s: int) -> dict:
    """``cu_seqlens`` (CPU) and ``window_size`` of a masked point ({} for plain causal / full)."""
    if mask is None:
        return {}
    return dict(cu_seqlens=bench_documents(s), window_size=bench_window(s) if mask == "window" else None)


def visible_pairs(s: int, spec: dict) -> int:
    """Visible (query, key) pairs of a causal point with documents / a window (interval form)."""
    from dist_attn.kernels.flash_attn.masks import row_intervals
    lo, hi = row_intervals(s, s, 0, 0, True, spec["cu_seqlens"], spec["window_size"])
    return int((hi.long() - lo.long()).clamp(min=0).sum())


def make_masked_op(name: str, spec: dict, s: int, device):
    """A causal op with documents / a window (``spec`` from :func:`mask_spec`): ``(layout, fn)``."""
    cu, window = spec["cu_seqlens"].to(device), spec["window_size"]
    if name == "flash_attn":
        from dist_attn.kernels.flash_attn import flash_attn
        return "bshd", lambda q, k, v, g: flash_attn(q, k, v, causal=True, cu_seqlens=cu, window_size=window,
                                                     backend="triton" if device.type == "cuda" else "torch")
    if name == "sdpa_kernel":
        from dist_attn.kernels.flash_attn.sdpa_kernel import sdpa_softmax_kernel
        kern = sdpa_softmax_kernel()
        return "bshd", lambda q, k, v, g: kern(q, k, v, causal=True, cu_seqlens=cu, window_size=window)[0]
    pos = torch.arange(s, device=device)
    doc = torch.searchsorted(cu.long(), pos, right=True) - 1  # document of every position
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, ki):
            ok = (doc[qi] == doc[ki]) & (ki <= qi)
            return ok & (qi - ki <= window) if window is not None else ok
        block = create_block_mask(mask_mod, None, None, s, s, device=device)
        fa = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        return "bhsd", lambda q, k, v, g: fa(q, k, v, block_mask=block)
    if name in ("sdpa", "sdpa_efficient", "sdpa_cudnn"):
        if s > SDPA_MASK_MAX_S:
            raise MemoryError(f"a boolean [S, S] mask at S={s} (limit {SDPA_MASK_MAX_S})")
        import torch.nn.functional as F
        vis = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        if window is not None:
            vis &= pos[:, None] - pos[None, :] <= window
        if name == "sdpa":
            return "bhsd", lambda q, k, v, g: F.scaled_dot_product_attention(q, k, v, attn_mask=vis)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.EFFICIENT_ATTENTION if name == "sdpa_efficient" else SDPBackend.CUDNN_ATTENTION

        def pinned(q, k, v, g):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=vis)
        return "bhsd", pinned
    raise ImportError(f"{name} has no documents/window form here")


def select_rows(rows: list[dict]) -> list[dict]:
    """The ``auto`` table rows: per (mask, D, dtype, S) the faster of ours and torch's op at fwd+bwd."""
    ms: dict = {}
    for r in rows:
        if r["op"] in ("flash_attn", "sdpa_kernel") and r["mode"] == "fwd+bwd" and r["ms"] is not None:
            ms.setdefault((r["mask"], r["D"], r["dtype"], r["S"]), {})[
                "ours" if r["op"] == "flash_attn" else "sdpa"] = r["ms"]
    return [dict(mask=m, D=d, dtype=dt, S=s, winner=min(t, key=t.get), ms=t)
            for (m, d, dt, s), t in ms.items() if len(t) == 2]


def write_select_table(rows: list[dict], out_dir: str) -> str | None:
    """Merge this run's winners into ``sdpa_select_<gpu>.json`` (same keys replaced); None off GPU."""
    from dist_attn.kernels.flash_attn.sdpa_kernel import device_slug
    new = select_rows(rows)
    if not torch.cuda.is_available() or not new:
        return None
    path = os.path.join(out_dir, f"sdpa_select_{device_slug(torch.cuda.get_device_name())}.json")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("rows", [])
    keys = {(r["mask"], r["D"], r["dtype"], r["S"]) for r in new}
    merged = [r for r in old if (r["mask"], r["D"], r["dtype"], r["S"]) not in keys] + new
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(),
                       rule="winner of flash_attn (ours) vs sdpa_kernel (torch's flash op), fwd+bwd median ms",
                       rows=sorted(merged, key=lambda r: (r["mask"], r["D"], r["dtype"], r["S"]))), f, indent=1)
    return path


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not importable"
