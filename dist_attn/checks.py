"""Input validation shared by every strategy. All checks are local (no collective), so they run
before any communication and a bad input raises ``ValueError`` on every rank instead of hanging."""
from __future__ import annotations

from typing import Any, NoReturn

import torch
import torch.distributed as dist

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(where: str, expected: str, got: Any, fix: str) -> NoReturn:
    """The one error format of the package: ``<where>: expected <expected>, got <got>. Fix: <fix>``.
    ``got`` is printed as is when it is a string, else as its ``repr`` (pass ``repr(s)`` to quote a string)."""
    raise ValueError(f"{where}: expected {expected}, got {got if isinstance(got, str) else repr(got)}. Fix: {fix}")


def check_group(where: str, group) -> int:
    """Return the group size; raise unless torch.distributed is up and this rank is in ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        fail(where, "an initialised torch.distributed process group", "none",
             "call torch.distributed.init_process_group(...) first (or use world size 1 without a group)")
    if group is not None and dist.get_rank(group) < 0:
        fail(where, "this rank to be a member of the given group", f"global rank {dist.get_rank()} outside it",
             "pass the CP group this rank belongs to (see dist_attn.groups)")
    return dist.get_world_size(group)


def check_qkv(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              same_v_dim: bool = True) -> tuple[int, int, int, int]:
    """q ``[B, S/P, Hq, D]``, k ``[B, S/P, Hkv, D]``, v ``[B, S/P, Hkv, Dv]``; returns (B, S_local, Hq, Hkv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            fail(where, f"{name} to be a torch.Tensor", type(t).__name__, f"pass {name} as a tensor")
        if t.dim() != 4:
            fail(where, f"{name} of shape [batch, seq/cp, heads, head_dim] (4-D)", f"{tuple(t.shape)}",
                 "reshape to the [B, S, H, D] layout used throughout dist_attn")
        if t.dtype not in FLOAT_DTYPES:
            fail(where, f"{name} in one of fp16/bf16/fp32/fp64", str(t.dtype), "cast the inputs")
    if not (q.dtype == k.dtype == v.dtype):
        fail(where, "q, k, v of one dtype", f"{q.dtype}, {k.dtype}, {v.dtype}", "cast them to the same dtype")
    if not (q.device == k.device == v.device):
        fail(where, "q, k, v on one device", f"{q.device}, {k.device}, {v.device}", "move them to one device")
    b, s, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != s or v.shape[1] != s:
        fail(where, f"k and v with batch {b} and local sequence {s} like q", f"k {tuple(k.shape)}, v {tuple(v.shape)}",
             "shard q, k and v with the same layout")
    if k.shape[3] != d:
        fail(where, f"k head_dim {d} like q", f"{k.shape[3]}", "use the same head_dim for q and k")
    if k.shape[2] != v.shape[2]:
        fail(where, "k and v with the same number of heads", f"{k.shape[2]} and {v.shape[2]}", "fix the KV projection")
    if same_v_dim and v.shape[3] != d:
        fail(where, f"v head_dim {d} like q", f"{v.shape[3]}", "use the same head_dim for q, k and v")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        fail(where, "query heads a multiple of key/value heads (GQA/MQA)", f"Hq={hq}, Hkv={hkv}",
             "choose Hkv dividing Hq")
    return b, s, hq, hkv
