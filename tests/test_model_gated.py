"""The gated layers of the hybrid model: Gated DeltaNet (``D``) and gated linear attention (``G``).

* P = 1: each layer (fp64) against an fp64 reference of its math written here independently (per-document
  ``F.conv1d``, L2 norms, the Mamba2 gate, the step-by-step recurrences of ``naive.py``, gated RMSNorm),
  output and the gradient of every parameter and of the input, with and without packed documents.
* CP = 2 and 4 on gloo: layer outputs, input gradients and (all-reduced) parameter gradients equal the
  single-process layer's, for D and G, both layouts, with and without documents, linear_cp lasp2 (state
  passing) and ulysses (all-to-all), in fp64 (the distributed and single-process paths differ only in
  summation order). The D core's bytes per rank equal the cost model's closed forms (both forms).
* Config: patterns with D/G, parameter counts, validation errors, the DDDF / LLLLLLLF presets.

Runtime: ~25 s on 2 busy cores (one launch per world size).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.dist import run_distributed
from tests.utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, B = 40, 2
DOCS = [0, 7, 20, 33, 40]  # an interior start inside a chunk (7, 33) and one on a chunk boundary (20)


def _cfg(**kw):
    from dist_attn.model.config import ModelConfig
    base = dict(vocab_size=32, d_model=16, n_layers=2, pattern="DG", n_heads=4, linear_heads=4, linear_head_dim=4,
                delta_heads=4, delta_head_dim=4, delta_v_head_dim=6, conv_size=4, max_seq_len=256)
    return ModelConfig(**{**base, **kw})


def _layer(kind: str, cp, seed: int = 0):
    from dist_attn.model.layers import MIXERS, init_linear
    torch.manual_seed(seed)
    cfg = _cfg()
    layer = MIXERS[kind](cfg, cp)
    layer.apply(lambda m: init_linear(m, 0.3, 2))  # larger weights than the LM's init: non-trivial gates
    with torch.no_grad():
        for p in layer.parameters():  # break the norms' unit gains, keep A_log / dt_bias in a sensible range
            p.add_(0.1 * torch.randn_like(p))
    return layer.double()


# ---------------------------------------------------------------------------- fp64 references

def _conv_ref(x, w, docs):
    """Causal depthwise conv per document: x [B, S, C], w [C, K]."""
    k = w.shape[1]
    outs = []
    for a, b in zip(docs[:-1], docs[1:]):
        seg = F.pad(x[:, a:b].transpose(1, 2), (k - 1, 0))
        outs.append(F.conv1d(seg, w.unsqueeze(1), groups=w.shape[0]).transpose(1, 2))
    return torch.cat(outs, 1)


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _delta_ref(layer, x, docs):
    from dist_attn.kernels.gated_delta.naive import gated_delta_recurrent
    b, s, _ = x.shape
    h, dk, dv = layer.h, layer.dk, layer.dv
    q = layer.q_proj(x).view(b, s, h, dk)
    k = layer.k_proj(x).view(b, s, h, dk)
    v = layer.v_proj(x).view(b, s, h, dv)
    w = layer.conv_weight  # [H, 2Dk+Dv, K]: per head q, k, v channels
    q = F.silu(_conv_ref(q.reshape(b, s, -1), w[:, :dk].reshape(h * dk, -1), docs)).view(b, s, h, dk)
    k = F.silu(_conv_ref(k.reshape(b, s, -1), w[:, dk:2 * dk].reshape(h * dk, -1), docs)).view(b, s, h, dk)
    v = F.silu(_conv_ref(v.reshape(b, s, -1), w[:, 2 * dk:].reshape(h * dv, -1), docs)).view(b, s, h, dv)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = gated_delta_recurrent(q, k, v, beta, g, cu_seqlens=torch.tensor(docs))
    o = _rms(o, layer.out_norm.weight, layer.out_norm.eps) * F.silu(layer.gate(x).view(b, s, h, dv))
    return layer.o_proj(o.reshape(b, s, h * dv))


def _gated_linear_ref(layer, x, docs):
    from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent
    b, s, _ = x.shape
    shape = (b, s, layer.h, layer.hd)
    q, k = F.silu(layer.q_proj(x).view(shape)), F.silu(layer.k_proj(x).view(shape))
    g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = linear_attn_recurrent(q, k, layer.v_proj(x).view(shape), g=g, scale=layer.hd ** -0.5,
                                 cu_seqlens=torch.tensor(docs))
    o = _rms(o, layer.out_norm.weight, layer.out_norm.eps) * torch.sigmoid(layer.gate(x).view(shape))
    return layer.o_proj(o.reshape(b, s, -1))


@pytest.mark.parametrize("kind", ["D", "G"])
@pytest.mark.parametrize("docs", [None, DOCS], ids=["one_doc", "docs"])
def test_layer_matches_fp64_reference(kind, docs):
    from dist_attn.context import CPContext
    layer = _layer(kind, CPContext(backend="torch"))
    x = torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(B, S, 16, dtype=torch.float64)
    cu = None if docs is None else torch.tensor(docs)
    out = layer(x, torch.arange(S), cu)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], dy)
    ref_fn = _delta_ref if kind == "D" else _gated_linear_ref
    ref = ref_fn(layer, x, docs or [0, S])
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], dy)
    assert_close("out", ref, out)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert len(names) == len(grads)
    for name, r, g in zip(names, ref_grads, grads):
        assert r.abs().max() > 0, f"{name}: no gradient reaches it"
        assert_close(f"d{name}", r, g)


# ---------------------------------------------------------------------------- CP = 2, 4

def _cases(p, kinds=("D", "G")):
    """P = 2: every combination; P = 4: one per kind x strategy, layouts and documents alternating."""
    if p == 4:
        return [("D", "zigzag", DOCS, "lasp2"), ("D", "contiguous", None, "ulysses"),
                ("G", "zigzag", DOCS, "ulysses"), ("G", "contiguous", DOCS, "lasp2")]
    return [(kind, layout, docs, strategy) for kind in kinds for layout in ("zigzag", "contiguous")
            for docs in (None, DOCS) for strategy in ("lasp2", "ulysses")]


def _delta_bytes(group, p):
    """The D core's bytes and calls per rank (fp32 and bf16) against the cost model, both forms."""
    from dist_attn import dispatch
    from dist_attn.comm import CommRecorder
    from dist_attn.context import CPContext
    from dist_attn.cost_model import AttnShape, strategy_cost
    problems = []
    h, dk, dv, n = 4, 4, 6, S
    for strategy, model_name in (("lasp2", "delta_state"), ("ulysses", "delta_ulysses")):
        for layout in ("zigzag", "contiguous"):
            for dtype in (torch.float32, torch.bfloat16):
                cp = CPContext(group=group, layout=layout, linear_strategy=strategy, backend="torch")
                torch.manual_seed(1)
                q, k = (F.normalize(torch.randn(B, n // p, h, dk), dim=-1).to(dtype).requires_grad_() for _ in "qk")
                v = torch.randn(B, n // p, h, dv, dtype=dtype, requires_grad=True)
                beta = torch.rand(B, n // p, h, dtype=dtype, requires_grad=True)
                g = (-torch.rand(B, n // p, h)).requires_grad_()
                with CommRecorder() as fwd:
                    out = dispatch.delta_attention(q, k, v, beta, g, cp=cp)
                with CommRecorder() as bwd:
                    out.backward(torch.randn_like(out))
                shape = AttnShape(n, h, h, dk, batch=B, dtype_bytes=dtype.itemsize, layout=layout, v_head_dim=dv)
                pred = strategy_cost(model_name, shape, p, profile="h100")
                for phase, rec, model in (("fwd", fwd, pred.fwd), ("bwd", bwd, pred.bwd)):
                    got, want = (dict(rec.sent), dict(rec.calls)), (model.sent, model.calls)
                    if got != want:
                        problems.append(f"P={p} {model_name} {layout} {dtype} {phase}: measured {got}, model {want}")
    return problems


def _run_cases(group, cases):
    import torch.distributed as dist
    from dist_attn.context import CPContext
    from dist_attn.layout import position_ids, shard
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    x = torch.randn(B, S, 16, dtype=torch.float64)
    dy = torch.randn(B, S, 16, dtype=torch.float64)
    results = []
    refs = {}
    for kind, layout, docs, strategy in cases:
        cu = None if docs is None else torch.tensor(docs)
        key = (kind, str(docs))
        if key not in refs:  # the single-process layer on the full sequence
            local = _layer(kind, CPContext(backend="torch"))
            xr = x.clone().requires_grad_(True)
            out = local(xr, torch.arange(S), cu)
            grads = torch.autograd.grad(out, [xr, *local.parameters()], dy)
            refs[key] = (out.detach(), grads)
        ref_out, ref_grads = refs[key]
        cp = CPContext(group=group, layout=layout, linear_strategy=strategy, backend="torch")
        layer = _layer(kind, cp)
        xl = shard(x, rank, p, layout).requires_grad_(True)
        out = layer(xl, position_ids(S, rank, p, layout), cu)
        grads = list(torch.autograd.grad(out, [xl, *layer.parameters()], shard(dy, rank, p, layout)))
        for gr in grads[1:]:  # parameter gradients: each rank holds its tokens' share
            dist.all_reduce(gr, group=group)
        name = f"P={p} {kind} {layout} docs={docs is not None} {strategy}"
        try:
            assert_close(f"{name} out", shard(ref_out, rank, p, layout), out)
            assert_close(f"{name} dx", shard(ref_grads[0], rank, p, layout), grads[0])
            for (pname, _), r, g in zip(layer.named_parameters(), ref_grads[1:], grads[1:]):
                assert_close(f"{name} d{pname}", r, g)
        except AssertionError as e:
            results.append(str(e))
    return results


def _worker(rank, world):
    """One launch of 4 ranks: two CP groups of 2 (ranks 0-1 the D cases and the bytes, ranks 2-3 the G
    cases), then the whole world as one CP group of 4."""
    import torch.distributed as dist
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    kind = "D" if rank < 2 else "G"
    problems = _run_cases(pair, _cases(2, kinds=(kind,)))
    if kind == "D":
        problems += _delta_bytes(pair, 2)
    return problems + _run_cases(dist.group.WORLD, _cases(4))


def test_layers_under_cp_match_single_process():
    problems = run_distributed(_worker, 4, timeout=300, reuse=True)
    assert all(r == [] for r in problems), "\n".join(sum(problems, []))


# ---------------------------------------------------------------------------- config

def test_config_counts_and_patterns():
    from dist_attn.model.hybrid import HybridLM
    for pattern in ("DDDF", "GGGF", "LGDF"):
        cfg = _cfg(pattern=pattern, n_layers=4, n_kv_heads=2, head_dim=8)
        model = HybridLM(cfg)
        assert model.num_params() == cfg.num_params(), pattern
        assert cfg.flops_per_token(64) > 6 * (cfg.num_params() - cfg.vocab_size * cfg.d_model)
    kinds = [type(b.mixer).__name__ for b in HybridLM(_cfg(pattern="LGDF", n_layers=4)).blocks]
    assert kinds == ["LinearAttention", "GatedLinearAttention", "GatedDeltaNet", "SoftmaxAttention"]


@pytest.mark.parametrize("kw,needle", [
    (dict(pattern="DXF"), "ModelConfig.pattern"),
    (dict(conv_size=0), "ModelConfig.conv_size"),
    (dict(delta_heads=3, delta_head_dim=None), "ModelConfig.delta_heads"),
    (dict(delta_v_head_dim=0), "ModelConfig.delta_v_head_dim"),
])
def test_config_rejects_bad_gated_sizes(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


def test_plan_checks_delta_heads():
    from dist_attn.plan import ParallelPlan
    cfg = _cfg(pattern="DDDF", delta_heads=2, delta_head_dim=8)
    ParallelPlan.build(4, cp=2, tp=2).check_model(cfg)
    with pytest.raises(ValueError, match="delta_heads"):
        ParallelPlan.build(4, cp=4, linear_cp="ulysses").check_model(cfg)
    plan, why = ParallelPlan.build(2, cp=2, linear_cp="auto").resolve_auto(cfg, seq_len=64, gpus_per_node=8)
    assert plan.linear_cp in ("lasp2", "ulysses") and "D" in why[0]


@pytest.mark.parametrize("preset,pattern", [("tiny_gdn", "DDDF"), ("tiny_minimax", "LLLLLLLF")])
def test_presets(preset, pattern):
    from dist_attn.model.config import ModelConfig
    with open(os.path.join(ROOT, "configs", "model", f"{preset}.yaml")) as f:
        cfg = ModelConfig(**yaml.safe_load(f))
    assert cfg.layer_types == pattern


def test_incremental_decode_of_gated_layers_matches_full_forward():
    """generate.py's D and G decoders (recurrent state + conv window): prefill then one token at a time
    gives the full forward's logits (fp64)."""
    from dist_attn.model.generate import prefill, step
    from dist_attn.model.hybrid import HybridLM
    torch.manual_seed(0)
    model = HybridLM(_cfg(pattern="DGDF", n_layers=4, n_kv_heads=2, head_dim=8)).double().eval()
    ids = torch.randint(0, 32, (2, 13))
    with torch.no_grad():
        full = model(ids, torch.arange(13))
        logits, cache = prefill(model, ids[:, :5])
        assert_close("prefill", full[:, :5], logits)
        for t in range(5, 13):
            assert_close(f"step {t}", full[:, t], step(model, ids[:, t], cache))
