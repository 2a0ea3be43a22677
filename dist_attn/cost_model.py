"""Cost model of the CP strategies: FLOPs, bytes per link class, collective steps, predicted time.

For one attention layer on one rank of a CP group of P ranks (B batch, N global tokens, Hq/Hkv heads,
D head dim, b bytes per element, sl = N/P local tokens, C = N/(2P) zigzag chunk)::

    strategy        bytes sent forward                 bytes sent backward                      rounds f / b
    zigzag_ring     2(P-1)/P·B·N·Hkv·D·b  (p2p)         2(P-1)/P·B·N·Hkv·D·(b+4) (K/V; fp32 dK/dV) P-1 / 2(P-1)
    allgather       2(P-1)/P·B·N·Hkv·D·b  (all_gather)  that + 2(P-1)/P·B·N·Hkv·D·4 (reduce_scatter)  1 / 2
    ulysses         (P-1)/P²·B·N·D·b·(2Hq + 2Hkv')      the same (dout in; dq, dk, dv out)           2 / 2
    usp(U, R)       (U-1)/(U·P)·B·N·D·b·(2Hq + 2Hkv')  all-to-all over U, plus the ring over R with
                    Hkv'/U heads: 2(R-1)/R·B·N·(Hkv'/U)·D·b forward, ·(b+4) backward   2+(R-1) / 2+2(R-1)
    lasp2           (P-1)·c·B·H·Dk·Dv·4  (fp32 states; c = 2 zigzag, 1 contiguous chunks per rank)  1 / 1
    linear_ulysses  (P-1)/P²·B·N·b·H·(2Dk + 2Dv)                                                  2 / 2
    delta_state     (P-1)·c·B·H·Dk·(Dk+Dv)·4  (maps [b | A])   (P-1)·c·B·H·Dk·Dv·4 (state grads)   1 / 1
    delta_ulysses   (P-1)/P²·B·N·H·(b·(2Dk + 2Dv + 1) + 4)  the same (g: fp32, own call unless b=4) 2(3) / 2(3)

``delta_*`` are the Gated DeltaNet (``D``) layers' two forms of ``parallel.linear_cp`` (``lasp2`` = state
passing through :func:`dist_attn.gated_delta.gated_delta_attention`, ``ulysses`` = all-to-all head
parallelism, :func:`dist_attn.dispatch.delta_attention`); Dv is ``AttnShape.v_head_dim``. The state form
runs the local kernel at value width Dv + Dk and its gather waits for it (not overlapped), then every rank
scans the n = c·P chunk maps; the all-to-all form is capped by the head count (H % P == 0) and its two
all-to-alls are exposed.

Hkv' = max(Hkv, P) for Ulysses (KV heads replicated when Hkv < P; U for USP). The bytes are exactly what
:class:`dist_attn.comm.CommRecorder` counts (tests/test_cost_model.py asserts equality).

FLOPs per rank: softmax forward 4·B·Hq·sl·N·D, x0.5 causal (convention; the *time* charges whole
diagonal tiles: a causal sq x sq block costs (n+1)/(2n) of the full block with n = sq/tile tiles);
backward 2.5x forward. Contiguous causal is unbalanced: FLOPs and time are those of the busiest
(last) rank; zigzag is balanced. Chunked linear: forward 4·B·H·sl·D·(C+D) (C = 64, no causal halving), backward
2x; LASP-2 adds its state einsums (2·B·H·sl·D² each: M, inter, and in backward dS_in, dq, dk, dv).

Links, the time of each strategy's phases and the memory passes: :mod:`dist_attn.cost_phases`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from dist_attn.checks import fail as _fail  # ValueError: "<where>: expected ..., got .... Fix: ..."
from dist_attn.cost_phases import CHUNK, MERGE_BYTES, masked_phases, strategy_phase  # noqa: F401 (re-exported)
from dist_attn.hardware import Phase, PhaseBuilder, detect_gpus_per_node, get_profile
from dist_attn.plan import head_split_ok

log = logging.getLogger("dist_attn.cost_model")

STRATEGIES = ("zigzag_ring", "allgather", "ulysses", "usp", "lasp2", "linear_ulysses", "delta_state",
              "delta_ulysses")
MODEL_ONLY = ("lasp1", "linear_ring")
LINEAR = ("lasp2", "linear_ulysses", "lasp1", "linear_ring", "delta_state", "delta_ulysses")
DELTA = ("delta_state", "delta_ulysses")
LABELS = {"linear_ulysses": "ulysses", "delta_state": "lasp2", "delta_ulysses": "ulysses"}  # -> linear_cp


@dataclass(frozen=True)
class AttnShape:
    """One attention layer: global sequence ``seq_len`` of ``batch`` sequences, q ``[B, N, heads, D]``,
    k/v ``[B, N, kv_heads, D]``, ``dtype_bytes`` per element."""
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype_bytes: int = 2
    causal: bool = True
    layout: str = "zigzag"
    cu_seqlens: Optional[tuple] = None
    """Packed documents: global offsets ``(0, e_1, ..., seq_len)`` (softmax strategies; see ``_masked``)."""
    window_size: Optional[int] = None
    """Sliding window W (causal): a query sees keys p - W .. p."""
    v_head_dim: int = 0
    """Value head dim Dv of a Gated DeltaNet layer (delta_* strategies); 0: ``head_dim``."""

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    def __post_init__(self):
        for name in ("seq_len", "heads", "kv_heads", "head_dim", "batch"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail("AttnShape", f"{name} a positive int", repr(val), f"pass {name} >= 1")
        if self.dtype_bytes not in (2, 4, 8):
            _fail("AttnShape", "dtype_bytes in (2, 4, 8)", repr(self.dtype_bytes), "2 for bf16/fp16, 4 for fp32")
        if self.heads % self.kv_heads:
            _fail("AttnShape", "kv_heads dividing heads (GQA/MQA)", f"heads={self.heads}, kv_heads={self.kv_heads}",
                  "choose kv_heads dividing heads")
        if self.layout not in ("zigzag", "contiguous"):
            _fail("AttnShape", "layout 'zigzag' or 'contiguous'", repr(self.layout), "pass layout='zigzag'")


@dataclass(frozen=True)
class StrategyCost:
    strategy: str
    cp: int
    ulysses_degree: int
    gpus_per_node: int
    fwd: Phase
    bwd: Phase

    @property
    def time_s(self) -> float:
        return self.fwd.time_s + self.bwd.time_s

    @property
    def sent(self) -> int:
        return sum(self.fwd.sent.values()) + sum(self.bwd.sent.values())


def choose_softmax_masked(shape: AttnShape, cp: int, *, gpus_per_node: int, profile="auto") -> tuple:
    """``parallel.softmax_cp=auto`` with packed documents or a window: the valid softmax strategy with
    the lowest predicted time on ``shape`` (its ``cu_seqlens`` / ``window_size``) -> ``(name,
    ulysses_degree, reason)``, like :func:`choose_strategy`."""
    hw = get_profile(profile)
    ok, _ = candidates("softmax", shape, cp, gpus_per_node)
    costs = sorted((strategy_cost(n, shape, cp, profile=hw, gpus_per_node=gpus_per_node, ulysses_degree=u)
                    for n, u in ok), key=lambda c: c.time_s)
    docs = 0 if shape.cu_seqlens is None else len(shape.cu_seqlens) - 1
    ranking = " < ".join(f"{c.strategy}{f'(U={c.ulysses_degree})' if c.strategy == 'usp' else ''} "
                         f"{1e3 * c.time_s:.3g} ms" for c in costs)
    reason = (f"auto(softmax, N={shape.seq_len}, P={cp}, {docs} documents, window={shape.window_size}, "
              f"{hw.name}): {costs[0].strategy} -- predicted fwd+bwd per layer {ranking}")
    log.info(reason)
    return costs[0].strategy, costs[0].ulysses_degree, reason


def strategy_cost(strategy: str, shape: AttnShape, cp: int, *, profile="h100", gpus_per_node=None,
                  ulysses_degree=None) -> StrategyCost:
    """Predicted cost of ``strategy`` for one layer of ``shape`` on a CP group of ``cp`` ranks.

    ``gpus_per_node`` defaults to the profile's; ``ulysses_degree`` (usp only) defaults to
    min(G, largest valid divisor of P). Raises ValueError when the heads cannot be split that way."""
    hw = get_profile(profile)
    where = f"strategy_cost({strategy!r})"
    if strategy not in STRATEGIES + MODEL_ONLY:
        _fail(where, f"one of {STRATEGIES + MODEL_ONLY}", repr(strategy), "pick a strategy from that list")
    if not isinstance(cp, int) or cp < 1:
        _fail(where, "cp a positive int", repr(cp), "pass the CP group size")
    chunks = 2 * cp if shape.layout == "zigzag" else cp
    if shape.seq_len % chunks:
        _fail(where, f"seq_len divisible by {chunks} ({shape.layout} over P={cp})", str(shape.seq_len),
              f"pad the sequence to a multiple of {chunks}")
    gpn = gpus_per_node or hw.gpus_per_node
    linear = strategy in LINEAR
    if linear and shape.kv_heads != shape.heads:
        _fail(where, "kv_heads == heads for linear attention", f"{shape.kv_heads} vs {shape.heads}",
              "project k/v to all heads")
    u = 1
    if strategy in ("ulysses", "linear_ulysses", "delta_ulysses"):
        u = cp
    elif strategy == "usp":
        u = ulysses_degree or max(d for d in range(1, min(cp, gpn) + 1) if cp % d == 0 and valid_split(shape, d))
    if u > 1:
        _check_split(where, shape, u, cp, linear)
    phases = []
    for bwd in (False, True):
        ph = PhaseBuilder(hw, gpn, hw.share(min(cp, gpn)))
        strategy_phase(ph, strategy, shape, cp, u, bwd, linear)
        phases.append(ph.done())
    if (shape.cu_seqlens is not None or shape.window_size is not None) and strategy not in LINEAR:
        phases = masked_phases(phases, strategy, shape, cp)
    return StrategyCost(strategy, cp, u, gpn, *phases)


def valid_split(shape: AttnShape, u: int) -> bool:
    """Can Ulysses split these heads over ``u`` ranks? The plan's rule (:func:`dist_attn.plan.head_split_ok`)."""
    return head_split_ok(shape.heads, shape.kv_heads, u)


def _check_split(where, shape: AttnShape, u: int, cp: int, linear: bool):
    if cp % u:
        divisors = [d for d in range(1, cp + 1) if cp % d == 0]
        _fail(where, f"ulysses_degree dividing P={cp}", str(u), f"pick U in {divisors}")
    if not valid_split(shape, u):
        _fail(where, f"heads split over Ulysses degree {u}: Hq % {u} == 0 and (Hkv % {u} == 0 or {u} % Hkv == 0)",
              f"Hq={shape.heads}, Hkv={shape.kv_heads}", "use a smaller Ulysses degree or a ring/all-gather strategy")


def candidates(layer_kind: str, shape: AttnShape, cp: int, gpn: int) -> tuple[list, list]:
    """([(strategy, ulysses_degree)] valid for the head split, [why others were left out])."""
    if layer_kind == "delta":
        if valid_split(shape, cp):
            return [("delta_state", 1), ("delta_ulysses", cp)], []
        return [("delta_state", 1)], [f"ulysses: H={shape.heads} not divisible by P={cp}"]
    if layer_kind == "linear":
        if valid_split(shape, cp):
            return [("lasp2", 1), ("linear_ulysses", cp)], []
        return [("lasp2", 1)], [f"ulysses: H={shape.heads} not divisible by P={cp}"]
    ok, skipped = [("zigzag_ring", 1), ("allgather", 1)], []
    if valid_split(shape, cp):
        ok.append(("ulysses", cp))
    else:
        skipped.append(f"ulysses: heads Hq={shape.heads}, Hkv={shape.kv_heads} do not split over P={cp}")
    for u in range(2, cp):
        if cp % u == 0 and u <= gpn and valid_split(shape, u):
            ok.append(("usp", u))
    return ok, skipped


def choose_strategy(layer_kind: str, *, heads: int, kv_heads: int, head_dim: int, seq_len: int, cp: int,
                    gpus_per_node=None, dtype_bytes: int = 2, profile="auto", batch: int = 1,
                    causal: bool = True, layout: str = "zigzag", v_head_dim: int = 0) -> tuple[str, int, str]:
    """``strategy=auto``: the valid strategy with the lowest predicted fwd+bwd time for one layer.

    Returns ``(name, ulysses_degree, reason)`` with ``name`` as :class:`dist_attn.context.CPContext`
    spells it (softmax: zigzag_ring | allgather | ulysses | usp; linear and delta (Gated DeltaNet, value
    head dim ``v_head_dim``, 0 = ``head_dim``): lasp2 (state passing) | ulysses) and the
    Ulysses degree (P for ulysses, U for usp, 1 otherwise). GPUs per node: the argument, else NVML,
    else ``LOCAL_WORLD_SIZE``, else the profile's default. Logs the one-line ``reason``."""
    where = "choose_strategy"
    if layer_kind not in ("softmax", "linear", "delta"):
        _fail(where, "layer_kind 'softmax', 'linear' or 'delta'", repr(layer_kind), "pass the attention layer type")
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        _fail(where, "cp a positive int", repr(cp), "pass the CP group size")
    hw = get_profile(profile)
    src = "argument"
    if gpus_per_node is None:
        gpus_per_node, src = detect_gpus_per_node()
        if gpus_per_node is None:
            gpus_per_node, src = hw.gpus_per_node, f"{hw.name} default"
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        _fail(where, "gpus_per_node a positive int or None", repr(gpus_per_node), "pass the GPUs per node")
    shape = AttnShape(seq_len, heads, kv_heads, head_dim, batch, dtype_bytes, causal, layout,
                      v_head_dim=v_head_dim)
    if layer_kind in ("linear", "delta") and kv_heads != heads:
        _fail(where, "kv_heads == heads for a linear layer", f"{kv_heads} vs {heads}", "pass kv_heads=heads")
    if cp == 1:
        name = "zigzag_ring" if layer_kind == "softmax" else "lasp2"
        return name, 1, f"auto({layer_kind}): cp=1, no context parallelism (the local kernel runs)"
    chunks = 2 * cp if layout == "zigzag" else cp
    if seq_len % chunks:
        _fail(where, f"seq_len divisible by {chunks} ({layout} over cp={cp})", str(seq_len),
              f"pad the sequence to a multiple of {chunks}")
    ok, skipped = candidates(layer_kind, shape, cp, gpus_per_node)
    costs = sorted((strategy_cost(n, shape, cp, profile=hw, gpus_per_node=gpus_per_node, ulysses_degree=u)
                    for n, u in ok), key=lambda c: c.time_s)
    best = costs[0]
    label = LABELS.get(best.strategy, best.strategy)
    nodes = -(-cp // gpus_per_node)
    ranking = " < ".join(f"{c.strategy}{f'(U={c.ulysses_degree})' if c.strategy == 'usp' else ''} "
                         f"{1e3 * c.time_s:.3g} ms" for c in costs)
    reason = (f"auto({layer_kind}, N={seq_len}, P={cp} on {nodes} node(s) of {gpus_per_node} [{src}], "
              f"Hq={heads}, Hkv={kv_heads}, D={head_dim}, {hw.name}): {label} -- predicted fwd+bwd per layer "
              f"{ranking}" + (f"; not valid: {'; '.join(skipped)}" if skipped else ""))
    log.info(reason)
    return label, best.ulysses_degree, reason


def choose_linear_cp(model_cfg, *, seq_len: int, cp: int, gpus_per_node=None, dtype_bytes: int = 2,
                     profile="auto", batch: int = 1, layout: str = "zigzag") -> tuple[str, str]:
    """``parallel.linear_cp=auto`` for a model whose pattern has Gated DeltaNet (``D``) layers: one choice
    covers the ``L``/``G`` and ``D`` layers, so each option (``lasp2`` = state passing, ``ulysses`` =
    all-to-all, valid only if every such layer's heads split over P) is charged the sum over the layers
    of its predicted fwd+bwd time; the cheapest wins. Returns ``(linear_cp, reason)``; logs the reason."""
    m = model_cfg
    kinds = {t: m.layer_types.count(t) for t in "LGD" if t in m.layer_types}
    if cp == 1 or not kinds:
        return "lasp2", "auto(linear): cp=1 or no linear layers, state passing (nothing to choose)"
    if gpus_per_node is None:
        gpus_per_node = detect_gpus_per_node()[0] or get_profile(profile).gpus_per_node
    common = dict(profile=profile, gpus_per_node=gpus_per_node)
    shapes = {t: (AttnShape(seq_len, m.lin_heads, m.lin_heads, m.lin_head_dim, batch, dtype_bytes, True, layout)
                  if t != "D" else AttnShape(seq_len, m.d_heads, m.d_heads, m.d_head_dim, batch, dtype_bytes, True,
                                             layout, v_head_dim=m.d_v_head_dim)) for t in kinds}
    names = {"lasp2": {"L": "lasp2", "G": "lasp2", "D": "delta_state"},
             "ulysses": {"L": "linear_ulysses", "G": "linear_ulysses", "D": "delta_ulysses"}}
    totals, skipped = {}, []
    for option, per_kind in names.items():
        bad = [t for t in kinds if option == "ulysses" and not valid_split(shapes[t], cp)]
        if bad:
            skipped.append(f"ulysses: heads of {'/'.join(bad)} layers do not split over P={cp}")
            continue
        totals[option] = sum(n * strategy_cost(per_kind[t], shapes[t], cp, **common).time_s for t, n in kinds.items())
    best = min(totals, key=totals.get)
    ranking = " < ".join(f"{o} {1e3 * t:.3g} ms" for o, t in sorted(totals.items(), key=lambda x: x[1]))
    reason = (f"auto(linear layers {''.join(f'{n}x{t}' for t, n in kinds.items())}, N={seq_len}, P={cp}, "
              f"{gpus_per_node} GPUs/node): {best} -- predicted fwd+bwd, all such layers: {ranking}"
              + (f"; not valid: {'; '.join(skipped)}" if skipped else ""))
    log.info(reason)
    return best, reason
