"""One validated parallel plan: the sizes, CP strategies and rank coordinates of a training job.

    plan = ParallelPlan.build(world_size=8, tp=2, cp=2, pp=1, softmax_cp="ulysses")   # dp derived: 2
    plan.check_model(model_cfg); plan.check_sequence(seq_len)  # head splits, layout divisibility
    plan, why = plan.resolve_auto(model_cfg, seq_len=4096)     # a NEW plan with auto strategies chosen
    plan.coords(rank)                                          # RankCoords(tp, cp, dp, pp)

The plan is frozen and checks itself once, on construction (torchtitan's ``ParallelDims`` is the
model): positive sizes, ``world_size = dp * tp * cp * pp``, known layout and strategies, a USP Ulysses
degree dividing cp. Everything here is local (no process group needed), so a bad plan raises
``ValueError`` (expected / got / fix) on every rank alike before any collective. The trainer's config,
:class:`~dist_attn.context.CPContext`, the model, both engines and the cost model read it; nothing
in it imports more than :mod:`dist_attn.checks` and :mod:`dist_attn.layout`.

Rank layout (TP fastest, then CP, DP, PP: megatron-core's ``tp-cp-ep-dp-pp`` order; with tp = 1 the
ranks of one CP group are neighbours, i.e. on one node first)::

    global_rank = tp_rank + T * (cp_rank + P * (dp_rank + DP * pp_rank))

The Ulysses head-split rule (:func:`check_head_split`) is written here once: Ulysses over U ranks
gives each rank Hq/U query heads and Hkv/U KV heads, or, when Hkv < U, replicates each KV head U/Hkv
times. So Hq % U == 0, and Hkv % U == 0 (Hkv >= U) or U % Hkv == 0 (Hkv < U).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from dist_attn.checks import fail
from dist_attn.layout import LAYOUTS, num_chunks

SOFTMAX_STRATEGIES = ("zigzag_ring", "ulysses", "usp", "allgather")
LINEAR_STRATEGIES = ("lasp2", "ulysses")
KERNEL_BACKENDS = ("auto", "triton", "torch")
AUTO = "auto"


# ---------------------------------------------------------------------------- the head-split rule

def head_split_ok(hq: int, hkv: int, degree: int) -> bool:
    """Can Ulysses split Hq query and Hkv KV heads over ``degree`` ranks (see the module docstring)?"""
    if degree < 1 or hq % degree != 0 or hkv < 1:
        return False
    return hkv % degree == 0 if hkv >= degree else degree % hkv == 0


def check_head_split(where: str, hq: int, hkv: int, degree: int, name: str = "Ulysses degree (P)") -> int:
    """Raise unless the heads can be split over ``degree`` ranks; return the KV replication factor."""
    if hq % degree != 0:
        fail(where, f"the number of query heads (Hq) divisible by the {name}={degree}", f"Hq={hq}",
             f"choose Hq a multiple of {degree}, or a smaller Ulysses degree (ring attention has no head limit)")
    if hkv >= degree:
        if hkv % degree != 0:
            fail(where, f"the number of KV heads (Hkv) divisible by the {name}={degree} when Hkv >= it",
                 f"Hkv={hkv}", f"choose Hkv a multiple of {degree}, or Hkv dividing {degree} (KV heads are "
                 f"then replicated)")
        return 1
    if degree % hkv != 0:
        fail(where, f"the {name}={degree} divisible by the number of KV heads (Hkv) when Hkv < it, so KV "
             f"heads can be replicated evenly", f"Hkv={hkv}", f"choose Hkv dividing {degree}")
    return degree // hkv


def check_model_heads(model_cfg, *, softmax_cp: str, softmax_degree: int, linear_cp: str, linear_degree: int,
                      tp: int = 1, prefix: str = "model.") -> None:
    """The head splits a model needs under TP x Ulysses: heads divide over ``tp`` (megatron splits them),
    then the ``H/tp`` heads of a TP rank over the Ulysses degree of each layer type (``softmax_degree``:
    P for ulysses, U for usp, 1 otherwise; ``linear_degree``: P for linear ulysses, else 1)."""
    m, kinds = model_cfg, set(model_cfg.layer_types)
    if tp > 1:
        checks = []
        if "F" in kinds:
            checks += [("n_heads", m.n_heads, "softmax heads are split over TP"),
                       ("n_kv_heads", m.kv_heads, "KV groups are split over TP")]
        if kinds & {"L", "G"}:
            checks.append(("linear_heads", m.lin_heads, "linear heads are split over TP"))
        if "D" in kinds:
            checks.append(("delta_heads", m.d_heads, "Gated DeltaNet heads are split over TP"))
        for name, value, why in checks:
            if value % tp != 0:
                fail(f"{prefix}{name}", f"a multiple of tp={tp} ({why})", value, f"change {name} or tp")
    per_rank = " per TP rank" if tp > 1 else ""
    if "F" in kinds and softmax_degree > 1:
        check_head_split(f"{prefix}n_heads / n_kv_heads (softmax_cp={softmax_cp} shards the {m.n_heads // tp} / "
                         f"{m.kv_heads // tp} heads{per_rank})", m.n_heads // tp, m.kv_heads // tp,
                         softmax_degree, "Ulysses degree")
    if kinds & {"L", "G"} and linear_degree > 1:
        h = m.lin_heads // tp
        check_head_split(f"{prefix}linear_heads (linear_cp={linear_cp} shards the {h} heads{per_rank})", h, h,
                         linear_degree, "CP size")
    if "D" in kinds and linear_degree > 1:
        h = m.d_heads // tp
        check_head_split(f"{prefix}delta_heads (linear_cp={linear_cp} shards the {h} heads{per_rank})", h, h,
                         linear_degree, "CP size")


# ---------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class RankCoords:
    """A rank's position on each parallel axis."""
    tp: int = 0
    cp: int = 0
    dp: int = 0
    pp: int = 0


def _positive(where: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail(where, "a positive integer", repr(v), f"set {where} >= 1")


@dataclass(frozen=True)
class ParallelPlan:
    """Sizes and CP strategies of a job; validated on construction (see the module docstring).

    Build it with :meth:`build` (derives dp) or :meth:`from_config` (a ``parallel`` config section)."""
    world_size: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B, megatron); > 1 needs pp >= 2."""
    layout: str = "zigzag"
    softmax_cp: str = "zigzag_ring"
    """zigzag_ring | ulysses | usp | allgather | auto (not yet resolved: see resolve_auto)."""
    linear_cp: str = "lasp2"
    """lasp2 | ulysses | auto."""
    ulysses_degree: int = 0
    """usp only: Ulysses degree U dividing cp (ring degree cp / U)."""
    kernel_backend: str = "auto"
    sp: bool = False
    """Megatron sequence parallelism over the TP group (needs tp > 1; from_config: on when tp > 1
    unless ``parallel.sp=false``)."""

    def __post_init__(self):
        for name in ("cp", "pp", "tp"):
            _positive(f"parallel.{name}", getattr(self, name))
        if self.vpp is not None:
            _positive("parallel.vpp", self.vpp)
            if self.vpp > 1 and self.pp < 2:
                fail("parallel.vpp", "null or 1 without pipelining (parallel.pp=1); virtual stages need pp >= 2",
                     self.vpp, "set parallel.vpp=null, or parallel.pp >= 2 for interleaved 1F1B")
        model_par = self.tp * self.cp * self.pp
        if not isinstance(self.dp, int) or self.dp < 1 or self.dp * model_par != self.world_size:
            fail("parallel.dp * parallel.tp * parallel.cp * parallel.pp", f"the world size {self.world_size}",
                 f"dp={self.dp} * tp={self.tp} * cp={self.cp} * pp={self.pp}",
                 f"launch tp*cp*pp*dp processes or change the sizes so that they multiply to {self.world_size}")
        if self.layout not in LAYOUTS:
            fail("parallel.layout", f"one of {LAYOUTS}", repr(self.layout), "use zigzag (balanced causal work)")
        if self.softmax_cp not in SOFTMAX_STRATEGIES + (AUTO,):
            fail("parallel.softmax_cp", f"one of {SOFTMAX_STRATEGIES + (AUTO,)}", repr(self.softmax_cp),
                 "use zigzag_ring")
        if self.linear_cp not in LINEAR_STRATEGIES + (AUTO,):
            fail("parallel.linear_cp", f"one of {LINEAR_STRATEGIES + (AUTO,)}", repr(self.linear_cp), "use lasp2")
        if self.kernel_backend not in KERNEL_BACKENDS:
            fail("parallel.kernel_backend", f"one of {KERNEL_BACKENDS}", repr(self.kernel_backend), "use auto")
        if self.sp and self.tp < 2:
            fail("parallel.sp", "false (or null) with parallel.tp=1: sequence parallelism shards over the TP "
                 "ranks", self.sp, "set parallel.sp=false, or parallel.tp >= 2 with backend=megatron")
        if self.softmax_cp == "usp" and self.cp > 1:
            u = self.ulysses_degree
            if not isinstance(u, int) or u < 1 or self.cp % u != 0:
                fail("parallel.ulysses_degree", f"a divisor of parallel.cp={self.cp} for softmax_cp=usp", u,
                     "set parallel.ulysses_degree=U with U dividing cp (Ulysses inside a node, ring over cp/U)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, world_size: int, *, dp: int = 0, **sizes) -> "ParallelPlan":
        """``dp=0`` derives dp = world_size / (tp * cp * pp); the plan then checks the product."""
        for name in ("cp", "pp", "tp"):
            _positive(f"parallel.{name}", sizes.get(name, 1))
        if not isinstance(dp, int) or isinstance(dp, bool) or dp < 0:
            fail("parallel.dp", "0 (derived) or a positive integer", repr(dp), "set parallel.dp=0")
        model_par = sizes.get("tp", 1) * sizes.get("cp", 1) * sizes.get("pp", 1)
        if dp == 0 and world_size % model_par != 0:
            fail("parallel.dp * parallel.tp * parallel.cp * parallel.pp", f"the world size {world_size}",
                 f"dp=derived * tp={sizes.get('tp', 1)} * cp={sizes.get('cp', 1)} * pp={sizes.get('pp', 1)}",
                 f"launch tp*cp*pp*dp processes (e.g. torchrun --nproc_per_node {model_par}) or change the "
                 f"sizes so that they multiply to {world_size}")
        return cls(world_size=world_size, dp=dp or world_size // model_par, **sizes)

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "ParallelPlan":
        """From a ``parallel`` config section (:class:`dist_attn.train.config.ParallelConfig`)."""
        p = parallel
        sp = getattr(p, "sp", None)  # None: sequence parallelism whenever there is tensor parallelism
        return cls.build(world_size, dp=p.dp, cp=p.cp, tp=p.tp, pp=p.pp, vpp=p.vpp, layout=p.layout,
                         softmax_cp=p.softmax_cp, linear_cp=p.linear_cp, ulysses_degree=p.ulysses_degree,
                         kernel_backend=p.kernel_backend, sp=bool(p.tp > 1 if sp is None else sp))

    def replace(self, **changes) -> "ParallelPlan":
        """A new, re-validated plan with ``changes`` (the plan itself is never mutated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived sizes
    @property
    def virtual(self) -> int:
        """Virtual stages per pipeline rank (1 without interleaving)."""
        return self.vpp or 1

    @property
    def resolved(self) -> bool:
        return AUTO not in (self.softmax_cp, self.linear_cp)

    @property
    def softmax_ulysses(self) -> int:
        """Ulysses degree of the softmax layers: P (ulysses), U (usp) or 1 (ring, all-gather, no CP)."""
        if self.cp == 1:
            return 1
        return {"ulysses": self.cp, "usp": self.ulysses_degree}.get(self.softmax_cp, 1)

    @property
    def linear_ulysses(self) -> int:
        """Ulysses degree of the linear layers: P for linear_cp=ulysses, else 1."""
        return self.cp if self.cp > 1 and self.linear_cp == "ulysses" else 1

    @property
    def usp_degree(self) -> int:
        """The Ulysses degree to build USP sub-groups with (0: no USP groups)."""
        return self.ulysses_degree if self.softmax_cp == "usp" and self.cp > 1 else 0

    # ------------------------------------------------------------------ coordinates
    def rank_of(self, *, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def coords(self, rank: int) -> RankCoords:
        """global rank -> its (tp, cp, dp, pp) coordinates."""
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        return RankCoords(tp=tp, cp=cp, dp=rest % self.dp, pp=rest // self.dp)

    def group_ranks(self, *axes: str) -> list[list[int]]:
        """Every group that varies over ``axes`` (e.g. ``"cp"``, or ``"dp", "cp"``) with the other axes
        fixed, each a sorted list of global ranks; the list is in one order on every rank."""
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}
        groups: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = dataclasses.asdict(self.coords(r))
            groups.setdefault(tuple(c[a] for a in sizes if a not in axes), []).append(r)
        return [groups[k] for k in sorted(groups)]

    # ------------------------------------------------------------------ checks against a model / data
    def check_model(self, model_cfg, prefix: str = "model.") -> None:
        """Heads over TP and over each layer type's Ulysses degree (:func:`check_model_heads`)."""
        if not self.resolved:
            raise AssertionError("resolve the auto strategies first (ParallelPlan.resolve_auto)")
        check_model_heads(model_cfg, softmax_cp=self.softmax_cp, softmax_degree=self.softmax_ulysses,
                          linear_cp=self.linear_cp, linear_degree=self.linear_ulysses, tp=self.tp, prefix=prefix)

    def check_sequence(self, seq_len: int, where: str = "data.seq_len") -> None:
        """The global sequence splits into the layout's chunks (P contiguous, 2P zigzag)."""
        n = num_chunks(self.cp, self.layout)
        if seq_len % n != 0:
            fail(where, f"a multiple of {n} ({self.layout} layout over cp={self.cp})", seq_len,
                 f"round {where} to a multiple of {n}")
        if self.sp and (seq_len // self.cp) % self.tp != 0:
            fail(where, f"seq_len / cp divisible by tp={self.tp} (sequence parallelism splits each CP shard "
                 f"over the TP ranks)", seq_len, f"round {where} to a multiple of {math.lcm(n, self.cp * self.tp)}"
                 f" or set parallel.sp=false")

    def resolve_auto(self, model_cfg, *, seq_len: int, batch: int = 1, dtype_bytes: int = 2,
                     gpus_per_node: Optional[int] = None) -> tuple["ParallelPlan", list[str]]:
        """A new plan with ``auto`` strategies replaced by the one the cost model
        (:func:`dist_attn.cost_model.choose_strategy`) predicts fastest, and its one-line reasons.
        Deterministic on every rank: GPUs per node default to torchrun's LOCAL_WORLD_SIZE (else NVML,
        else the hardware profile's)."""
        if self.resolved:
            return self, []
        from dist_attn.cost_model import choose_strategy  # the cost model reads plans: import it late
        m = model_cfg
        common = dict(seq_len=seq_len, cp=self.cp, batch=batch, dtype_bytes=dtype_bytes, layout=self.layout,
                      gpus_per_node=gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)
        changes: dict[str, Any] = {}
        reasons = []
        if self.softmax_cp == AUTO:
            name, u, why = choose_strategy("softmax", heads=m.n_heads, kv_heads=m.kv_heads,
                                           head_dim=m.softmax_head_dim, **common)
            changes.update(softmax_cp=name, ulysses_degree=u if name == "usp" else self.ulysses_degree)
            reasons.append(why)
        if self.linear_cp == AUTO and "D" in m.layer_types:  # one choice for the L/G and D layers together
            from dist_attn.cost_model import choose_linear_cp
            name, why = choose_linear_cp(m, **common)
            changes["linear_cp"] = name
            reasons.append(why)
        elif self.linear_cp == AUTO:
            name, _, why = choose_strategy("linear", heads=m.lin_heads, kv_heads=m.lin_heads,
                                           head_dim=m.lin_head_dim, **common)
            changes["linear_cp"] = name
            reasons.append(why)
        return self.replace(**changes), reasons

    def describe(self) -> str:
        """One line for logs."""
        vpp = f" vpp={self.vpp}" if self.virtual > 1 else ""
        vpp += " sp" if self.sp else ""
        usp = f" (U={self.ulysses_degree})" if self.usp_degree else ""
        return (f"world={self.world_size} = dp={self.dp} x tp={self.tp} x cp={self.cp} x pp={self.pp}{vpp} | "
                f"softmax={self.softmax_cp}{usp} linear={self.linear_cp} layout={self.layout}")
