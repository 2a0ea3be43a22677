"""Shared numerical checks. Every comparison is against an independent reference computed in fp64.

Tolerances are stated per dtype of the tensor under test, as an RMS-relative error
``rms(out - ref) / rms(ref)`` and a max-abs error relative to ``max|ref|``:

========  =========  ========
dtype     rms ratio  max ratio
========  =========  ========
float64   1e-9       1e-8
float32   2e-5       2e-4
float16   3e-3       2e-2
bfloat16  2e-2       1e-1
========  =========  ========

bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 ~ 2e-3); attention rounds P to bf16 before
the PV product and the inputs themselves are rounded, so a few roundoffs of RMS error are normal.
"""
from __future__ import annotations

import torch

TOLERANCES = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (3e-3, 2e-2),
    torch.bfloat16: (2e-2, 1e-1),
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> float:
    """Assert ``out`` matches ``ref`` within the tolerance of ``dtype`` (default ``out.dtype``), times
    ``scale``. Rejects NaN in ``out`` (unless ``ref`` has NaN at the same place) and shape mismatch.
    Infinite entries must match exactly. Returns the RMS ratio for reporting."""
    dtype = dtype or out.dtype
    rms_tol, max_tol = (t * scale for t in TOLERANCES[dtype])
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: output has NaN"
    inf_ref, inf_out = torch.isinf(ref64), torch.isinf(out64)
    assert torch.equal(inf_ref, inf_out) and torch.equal(ref64[inf_ref], out64[inf_out]), \
        f"{name}: infinities differ ({int(inf_ref.sum())} in reference, {int(inf_out.sum())} in output)"
    ref64, out64 = ref64[~inf_ref], out64[~inf_out]
    if ref64.numel() == 0:
        return 0.0
    diff = out64 - ref64
    base_rms = ref64.pow(2).mean().sqrt().item()
    base_max = ref64.abs().max().item()
    rms = diff.pow(2).mean().sqrt().item() / max(base_rms, 1e-30)
    mx = diff.abs().max().item() / max(base_max, 1e-30)
    if base_max == 0.0:  # exact zeros expected: judge absolute error
        rms, mx = diff.pow(2).mean().sqrt().item(), diff.abs().max().item()
    assert rms <= rms_tol and mx <= max_tol, (
        f"{name} ({dtype}): rms ratio {rms:.3e} (tol {rms_tol:.1e}), max ratio {mx:.3e} (tol {max_tol:.1e})")
    return rms


def collect_close(failures: list, tag: str, ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    """:func:`assert_close` plus ``got.dtype == dtype``, for a worker that gathers its mismatches: a
    failure is appended to ``failures`` (its message) instead of raised."""
    try:
        assert got.dtype == dtype, f"{tag}: dtype {got.dtype}"
        assert_close(tag, ref, got, dtype=dtype)
    except AssertionError as e:
        failures.append(str(e))


def assert_no_failures(results: list) -> list:
    """``results`` = one ``(failures, count)`` per rank (a worker that collects its mismatches instead of
    raising at the first): assert that no rank failed, listing every failure; return the per-rank counts."""
    failures = [f for fails, _ in results for f in fails]
    assert not failures, "\n".join(failures)
    return [n for _, n in results]


def value_error_report(call, cases) -> dict:
    """``{name: "ok" | "no error" | "message: ..."}``: ``call(**over)`` for each ``(name, needle, over)`` of
    ``cases``; "ok" when it raises a ValueError whose message contains ``needle`` and a "Fix:" part."""
    got = {}
    for name, needle, over in cases:
        try:
            call(**over)
            got[name] = "no error"
        except ValueError as e:
            got[name] = "ok" if needle in str(e) and "Fix:" in str(e) else f"message: {e}"
    return got
