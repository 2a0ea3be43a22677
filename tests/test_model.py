"""Hybrid model: shapes, parameter/FLOP counts, causality, RoPE, config errors, the CP-awareness
refusal, and CP = 2 / 4 (gloo) against the single-process model: same loss, same gradients.

CP tolerance (fp32): the strategies only reorder sums (online-softmax merges, state prefix sums,
all-reduced gradient pieces), so the loss must agree to 1e-5 relative and every parameter gradient
within the ``assert_close`` fp32 tolerance (rms ratio 2e-5, max ratio 2e-4 of the largest entry;
measured: loss 1.2e-7 relative, gradients <= 8e-7 rms ratio).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from dist_attn.context import CPContext
from dist_attn.model import HybridLM, ModelConfig, check_cp_awareness
from dist_attn.model.layers import LinearAttention, apply_rope, decay_schedule
from tests.dist import run_distributed
from tests.utils import assert_close

# softmax head dim 32 (a size the flash kernels take); 4 query heads so Ulysses can split over 4 ranks;
# 2 KV heads: GQA, replicated when the Ulysses degree is 4; 4 linear heads of dim 16
CFG = dict(vocab_size=64, d_model=64, n_layers=4, pattern="LFLF", n_heads=4, n_kv_heads=2, head_dim=32,
           linear_heads=4, max_seq_len=256)
SEQ, BATCH = 64, 2


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**CFG, **kw})


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, ::5] = -100  # some ignored targets, spread over every shard
    return ids[:, :-1], labels


def model_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ single process
def test_forward_shapes_counts_and_pipeline():
    for kw in ({}, {"tie_embeddings": True, "gated_attention": False}, {"pattern": "LLLF", "n_kv_heads": 1}):
        cfg = tiny(**kw)
        model = HybridLM(cfg)
        assert model.num_params() == cfg.num_params(), kw
        ids, _ = batch()
        logits = model(ids, torch.arange(SEQ))
        assert logits.shape == (BATCH, SEQ, cfg.vocab_size) and torch.isfinite(logits).all()
        # [S] and [B, S] position ids are the same thing
        torch.testing.assert_close(model(ids, torch.arange(SEQ).expand(BATCH, -1)), logits, rtol=0, atol=0)
        stages = model.pipeline_layers()
        assert len(stages) == cfg.n_layers + 2
        x = (ids, torch.arange(SEQ))
        for st in stages[:-1]:
            x = st(x)
            assert isinstance(x, tuple) and x[0].shape == (BATCH, SEQ, cfg.d_model)
        torch.testing.assert_close(stages[-1](x), logits, rtol=0, atol=0)
    assert [b.kind for b in HybridLM(tiny(n_layers=6, pattern="LLF")).blocks] == list("LLFLLF")


def test_init_deterministic_from_seed():
    torch.manual_seed(3)
    a = HybridLM(tiny())
    torch.manual_seed(3)
    b = HybridLM(tiny())
    torch.manual_seed(4)
    c = HybridLM(tiny())
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), n
    # linear-layer q/k/v start at d_model^-1/2 (scale-invariant, see ModelConfig); other matrices at init_std,
    # output projections at init_std / sqrt(2 n_layers)
    stds = {n: float(p.detach().std()) for n, p in a.named_parameters()}
    assert abs(stds["blocks.0.mixer.v_proj.weight"] / 64 ** -0.5 - 1) < 0.05
    assert abs(stds["blocks.1.mixer.q_proj.weight"] / 0.02 - 1) < 0.05
    assert abs(stds["blocks.1.mixer.o_proj.weight"] / (0.02 / 8 ** 0.5) - 1) < 0.05


def test_causal():
    model = HybridLM(tiny())
    ids, _ = batch()
    ids2 = ids.clone()
    ids2[:, 40] = (ids2[:, 40] + 1) % CFG["vocab_size"]
    out1, out2 = model(ids, torch.arange(SEQ)), model(ids2, torch.arange(SEQ))
    torch.testing.assert_close(out1[:, :40], out2[:, :40], rtol=0, atol=0)
    assert (out1[:, 40:] - out2[:, 40:]).abs().amax(-1).min() > 0  # every later token sees the change


def test_rope_depends_on_relative_position():
    q, k = torch.randn(1, 8, 2, 32, dtype=torch.float64), torch.randn(1, 8, 2, 32, dtype=torch.float64)
    pos = torch.tensor([0, 5, 6, 7, 20, 21, 22, 30])  # a zigzag-like, non-contiguous set of positions
    dots = torch.einsum("bihd,bjhd->bhij", apply_rope(q, pos, 1e4), apply_rope(k, pos, 1e4))
    dots_shift = torch.einsum("bihd,bjhd->bhij", apply_rope(q, pos + 1000, 1e4), apply_rope(k, pos + 1000, 1e4))
    torch.testing.assert_close(dots, dots_shift, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(apply_rope(q, pos, 1e4), apply_rope(q, pos + 1, 1e4))
    torch.testing.assert_close(apply_rope(q, torch.zeros(8, dtype=torch.long), 1e4), q)  # position 0: identity


def test_decay_schedule_and_buffer():
    g = decay_schedule(8, 0.6, 0.999)
    lam = g.double().exp()
    assert (g <= 0).all() and torch.all(lam[1:] > lam[:-1])
    torch.testing.assert_close(lam[[0, -1]], torch.tensor([0.6, 0.999], dtype=torch.float64), rtol=1e-6, atol=0)
    lin = LinearAttention(tiny(), CPContext())
    assert "log_decay" not in dict(lin.named_parameters()) and "log_decay" not in lin.state_dict()


def test_loss_sum_token_weighted():
    torch.manual_seed(0)
    logits, (_, labels) = torch.randn(BATCH, SEQ, 64), batch()
    s, n = HybridLM.loss_sum(logits, labels)
    mask = labels != -100
    assert s.dtype == torch.float32 and n.dtype == torch.long and int(n) == int(mask.sum())
    ref = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="mean")
    torch.testing.assert_close(s / n, ref)
    # split in two halves (two "ranks"): the sums add up to the global mean
    s1, n1 = HybridLM.loss_sum(logits[:, :20], labels[:, :20])
    s2, n2 = HybridLM.loss_sum(logits[:, 20:], labels[:, 20:])
    torch.testing.assert_close((s1 + s2) / (n1 + n2), ref)


def test_flops_per_token_convention():
    cfg = tiny(pattern="LF", n_layers=2, tie_embeddings=False)
    s = 1024
    n_matmul = cfg.num_params() - cfg.vocab_size * cfg.d_model
    softmax = 0.5 * 4 * s * 32 * 4           # causal-halved 4·S·D·Hq
    linear = 4 * 4 * 16 * (64 + 16)          # 4·H·D·(C + D), C = 64
    assert cfg.flops_per_token(s) == 6 * n_matmul + 3 * (softmax + linear)
    assert tiny(tie_embeddings=True).flops_per_token(s) > tiny(tie_embeddings=True).num_params() * 6


@pytest.mark.parametrize("kw,match", [
    (dict(pattern="LLXF"), "pattern.*'D', 'F', 'G', 'L'"),
    (dict(pattern=""), "pattern"),
    (dict(d_model=60, head_dim=None, n_heads=8), "n_heads.*divisor of d_model=60"),
    (dict(n_kv_heads=3), "n_kv_heads.*divisor of n_heads=4"),
    (dict(head_dim=33), "even softmax head dim"),
    (dict(linear_heads=5), "linear_heads.*divisor of d_model"),
    (dict(linear_decay_min=0.9, linear_decay_max=0.5), "linear_decay"),
    (dict(n_layers=0), "n_layers.*positive"),
    (dict(ffn_hidden=-3), "ffn_hidden"),
    (dict(linear_qkv_init_std=0.0), "linear_qkv_init_std"),
], ids=["bad-char", "empty", "heads-d_model", "gqa", "odd-rope", "linear-heads", "decay", "layers", "ffn",
        "qkv-std"])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny(**kw)
    assert "Fix:" in str(e.value)


# ------------------------------------------------------------------ CP-awareness (no collective needed)
@dataclass(frozen=True)
class FakeCP(CPContext):
    """A CP context that claims P ranks without a process group: every check before the first
    collective can be exercised in one process."""
    fake_world: int = 2

    @property
    def world_size(self) -> int:
        return self.fake_world


class LocalConvMixer(nn.Module):
    """Mixes tokens with a causal conv over the local shard only: must be refused under CP."""
    token_mixing = True

    def __init__(self, cfg, cp):
        super().__init__()
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, 3, padding=2)

    def forward(self, x, position_ids):
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class ConvHybrid(HybridLM):
    MIXERS = {**HybridLM.MIXERS, "L": LocalConvMixer}


def test_cp_awareness_refusal():
    HybridLM(tiny(), FakeCP(fake_world=2))  # the stock model passes
    ConvHybrid(tiny(), CPContext())  # without CP a local mixer is fine
    with pytest.raises(ValueError, match="LocalConvMixer.*not CP-aware"):
        ConvHybrid(tiny(), FakeCP(fake_world=2))
    model = HybridLM(tiny())
    model.blocks[1].mlp.extra = nn.Conv1d(4, 4, 3)  # an unknown module type is not assumed pointwise
    with pytest.raises(ValueError, match="Conv1d.*not known to be pointwise"):
        check_cp_awareness(model)


@pytest.mark.parametrize("kw,cp,match", [
    (dict(n_heads=2, head_dim=32), FakeCP(fake_world=4, softmax_strategy="ulysses"),
     r"n_heads.*query heads \(Hq\) divisible by the Ulysses degree=4"),
    (dict(n_heads=8, n_kv_heads=8, head_dim=32), FakeCP(fake_world=3, softmax_strategy="ulysses"),
     r"n_heads.*query heads \(Hq\) divisible by the Ulysses degree=3"),
    (dict(n_heads=12, n_kv_heads=4, head_dim=32), FakeCP(fake_world=6, softmax_strategy="ulysses"),
     r"n_kv_heads.*Ulysses degree=6 divisible by the number of KV heads"),
    (dict(linear_heads=2), FakeCP(fake_world=4, linear_strategy="ulysses"),
     r"linear_heads.*query heads \(Hq\) divisible by the CP size=4"),
], ids=["ulysses-q", "ulysses-3", "ulysses-kv", "linear-ulysses"])
def test_cp_head_divisibility(kw, cp, match):
    with pytest.raises(ValueError, match=match):
        HybridLM(tiny(**kw), cp)
    HybridLM(tiny(**kw), FakeCP(fake_world=cp.fake_world))  # zigzag_ring + lasp2 have no head limit


def test_forward_rejects_bad_inputs():
    model = HybridLM(tiny())
    ids, _ = batch()
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, torch.arange(SEQ - 1))
    with pytest.raises(ValueError, match="max_seq_len=256"):
        model(torch.zeros(1, 300, dtype=torch.long), torch.arange(300))
    with pytest.raises(ValueError, match="labels of shape"):
        HybridLM.loss_sum(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# ------------------------------------------------------------------ CP vs single process (gloo)
# (id, world, layout, softmax strategy, linear strategy, ulysses degree for usp[, model overrides])
COMBOS = [
    ("p2-zigzag-ring-lasp2", 2, "zigzag", "zigzag_ring", "lasp2", None),
    ("p2-contig-allgather-ulysses", 2, "contiguous", "allgather", "ulysses", None),
    ("p2-zigzag-ulysses-ulysses", 2, "zigzag", "ulysses", "ulysses", None),
    ("p2-zigzag-ring-window5", 2, "zigzag", "zigzag_ring", "lasp2", None, (("window_size", 5),)),
    ("p4-zigzag-ulysses-lasp2", 4, "zigzag", "ulysses", "lasp2", None),
    ("p4-contig-usp2x2-ulysses", 4, "contiguous", "usp", "ulysses", 2),
    ("p4-zigzag-usp2x2-lasp2", 4, "zigzag", "usp", "lasp2", 2),
    ("p4-contig-ring-lasp2", 4, "contiguous", "zigzag_ring", "lasp2", None),
    ("p4-contig-ring-window3", 4, "contiguous", "zigzag_ring", "lasp2", None, (("window_size", 3),)),
]


def _cp_worker(rank, world, combos, cfg_kw, ids, labels):
    """Every combo on this process group; returns {id: ("ok", loss, grads on rank 0) | ("err", msg)}."""
    import torch.distributed as dist

    from dist_attn.data.sharding import shard_batch

    out = {}
    for cid, _, layout, sm, lin, udeg, *extra in combos:
        try:
            ug = rg = None
            if sm == "usp":
                from dist_attn.groups import make_usp_groups
                ug, rg = make_usp_groups(None, udeg)
            cp = CPContext(group=dist.group.WORLD, layout=layout, softmax_strategy=sm, linear_strategy=lin,
                           ulysses_group=ug, ring_group=rg, backend="torch")
            torch.manual_seed(0)
            model = HybridLM(ModelConfig(**cfg_kw, **dict(*extra)), cp)
            x, y, pos = shard_batch(ids, labels, rank, world, layout)
            loss_sum, n_tok = HybridLM.loss_sum(model(x, pos), y)
            totals = torch.stack([loss_sum.detach(), n_tok.float()])
            dist.all_reduce(totals)
            (loss_sum / totals[1]).backward()  # this rank's share of the global mean loss
            grads = model_grads(model)
            for g in grads.values():
                dist.all_reduce(g)  # replicas' partial gradients sum to the global gradient
            # numpy, not tensors: torch's queue would share tensor storage with a process that exits
            out[cid] = ("ok", float(totals[0] / totals[1]),
                        {n: g.numpy() for n, g in grads.items()} if rank == 0 else None)
        except Exception as e:  # noqa: BLE001 - reported per combo in the parent
            out[cid] = ("err", f"{type(e).__name__}: {e}")
    # the refusal under a real group: raised before any collective, on every rank, no hang
    try:
        ConvHybrid(ModelConfig(**cfg_kw), CPContext(group=dist.group.WORLD))
        out["refusal"] = ("err", "ConvHybrid was accepted under CP")
    except ValueError as e:
        out["refusal"] = ("ok", str(e), None)
    return out


@functools.lru_cache(maxsize=None)
def _cp_results(world):
    ids, labels = batch()
    combos = [c for c in COMBOS if c[1] == world]
    return run_distributed(_cp_worker, world, combos, CFG, ids, labels, timeout=240.0, pg_timeout=60.0,
                           reuse=True)


@functools.lru_cache(maxsize=None)
def _reference(extra=()):
    ids, labels = batch()
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**CFG, **dict(extra)))
    s, n = HybridLM.loss_sum(model(ids, torch.arange(SEQ)), labels)
    (s / n).backward()
    return float(s.detach() / n), model_grads(model)


@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
def test_cp_matches_single_process(combo):
    results = _cp_results(combo[1])
    ref_loss, ref_grads = _reference(*combo[6:])
    status = results[0][combo[0]]
    assert status[0] == "ok", f"{combo[0]} failed on rank 0: {status[1]}"
    for r, res in enumerate(results):
        assert res[combo[0]][0] == "ok", f"{combo[0]} failed on rank {r}: {res[combo[0]][1]}"
        assert abs(res[combo[0]][1] - ref_loss) <= 1e-5 * abs(ref_loss), (r, res[combo[0]][1], ref_loss)
    grads = status[2]
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert_close(f"{combo[0]} grad {name}", g, torch.from_numpy(grads[name]))
    assert all(res["refusal"][0] == "ok" and "not CP-aware" in res["refusal"][1] for res in results)


def test_linear_decay_stays_exact_when_the_module_is_cast_to_bf16():
    # DeepSpeed casts buffers with the module; lambda^(L) over a long chunk is sensitive to g's rounding
    from unittest import mock

    from dist_attn.context import CPContext
    from dist_attn.model.config import ModelConfig
    from dist_attn.model.layers import LinearAttention, decay_schedule
    cfg = ModelConfig(vocab_size=32, d_model=64, n_layers=1, pattern="L", n_heads=4, head_dim=16)
    lin = LinearAttention(cfg, CPContext()).to(torch.bfloat16)
    assert lin.log_decay.dtype == torch.bfloat16
    seen = {}

    def spy(q, k, v, *, cp, decay, scale):
        seen["decay"] = decay
        return torch.zeros_like(v)

    with mock.patch("dist_attn.dispatch.linear_attention", spy):
        lin(torch.randn(1, 8, 64, dtype=torch.bfloat16), torch.arange(8))
    exact = decay_schedule(lin.h, cfg.linear_decay_min, cfg.linear_decay_max)
    assert seen["decay"].dtype == torch.float32 and torch.equal(seen["decay"], exact)


def test_window_size_reaches_the_softmax_layers():
    """The window is not silently dropped: a 5-token window changes the loss of the reference model, and
    the window in the CP combos above is the one the single-process reference uses."""
    assert abs(_reference((("window_size", 5),))[0] - _reference()[0]) > 1e-4
    with pytest.raises(ValueError, match="window_size"):
        tiny(window_size=-1)
