"""HybridLM <-> megatron ``GPTModel`` state dicts (part of the megatron adapter, pure torch: no megatron import).

:func:`hybridlm_to_megatron_state_dict` builds one TP rank's / pipeline chunk's megatron entries from a
:class:`~dist_attn.model.hybrid.HybridLM` state dict: each mixer's q/k/v/gate(/a/b) projections fused
into one column-parallel weight whose rows are grouped so that a contiguous split over T ranks gives
whole heads or KV groups (the row order is in :mod:`dist_attn.parallel._megatron_layers`' docstring,
"Fused projections"), per-head tensors and row/column-parallel weights sliced by TP rank.
:func:`megatron_to_hybridlm_state_dict` inverts it for a whole model on one TP rank (the export path).
"""
from __future__ import annotations

import torch

from dist_attn.model.config import ModelConfig


def _rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return w.chunk(size, dim=0)[rank]


def _cols(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return w.chunk(size, dim=1)[rank]


def _fused_softmax(sd: dict, p: str, m: ModelConfig) -> torch.Tensor:
    """``[q | k | v | gate]`` of HybridLM -> rows grouped per KV group (``_megatron_layers`` docstring)."""
    d, hd, hkv = m.d_model, m.softmax_head_dim, m.kv_heads
    r = m.n_heads // hkv
    parts = [sd[p + "q_proj.weight"].view(hkv, r * hd, d), sd[p + "k_proj.weight"].view(hkv, hd, d),
             sd[p + "v_proj.weight"].view(hkv, hd, d)]
    if m.gated_attention:
        parts.append(sd[p + "gate.weight"].view(hkv, r, d))
    return torch.cat(parts, dim=1).reshape(-1, d)


def _fused_linear(sd: dict, p: str, m: ModelConfig) -> torch.Tensor:
    d, hd, h = m.d_model, m.lin_head_dim, m.lin_heads
    parts = [sd[p + name + ".weight"].view(h, hd, d) for name in ("q_proj", "k_proj", "v_proj", "gate")]
    return torch.cat(parts, dim=1).reshape(-1, d)


def _fused_gated(sd: dict, p: str, m: ModelConfig) -> torch.Tensor:
    d, hd, h = m.d_model, m.lin_head_dim, m.lin_heads
    parts = [sd[p + name + ".weight"].view(h, hd, d) for name in ("q_proj", "k_proj", "v_proj", "gate")]
    return torch.cat(parts + [sd[p + "a_proj.weight"].view(h, 1, d)], dim=1).reshape(-1, d)


def _fused_delta(sd: dict, p: str, m: ModelConfig) -> torch.Tensor:
    d, h, dk, dv = m.d_model, m.d_heads, m.d_head_dim, m.d_v_head_dim
    parts = [sd[p + name + ".weight"].view(h, n, d) for name, n in
             (("q_proj", dk), ("k_proj", dk), ("v_proj", dv), ("gate", dv), ("a_proj", 1), ("b_proj", 1))]
    return torch.cat(parts, dim=1).reshape(-1, d)


FUSED = {"F": _fused_softmax, "L": _fused_linear, "G": _fused_gated, "D": _fused_delta}
FUSED_NAME = {"F": "linear_qkvg", "L": "linear_qkvg", "G": "linear_qkvga", "D": "linear_qkvgab"}
HEAD_PARAMS = {"G": ("A_log", "dt_bias"), "D": ("conv_weight", "A_log", "dt_bias")}


def hybridlm_to_megatron_state_dict(hybrid_sd: dict, model_cfg: ModelConfig, *, tp_rank: int = 0,
                                    tp_size: int = 1, first_layer: int = 0, num_layers: int | None = None,
                                    pre_process: bool = True, post_process: bool = True,
                                    share_embeddings: bool = False) -> dict:
    """A :class:`~dist_attn.model.hybrid.HybridLM` state dict -> the state dict of one megatron
    ``GPTModel`` chunk built by :func:`dist_attn.parallel.megatron.build_megatron_model`: TP rank ``tp_rank`` of
    ``tp_size``, global layers ``[first_layer, first_layer + num_layers)``, with the embedding
    (``pre_process``) and the final norm and output layer (``post_process``). ``share_embeddings``:
    the chunk has no ``output_layer.weight`` of its own (tied and on the first stage).
    """
    m = model_cfg
    n = m.n_layers - first_layer if num_layers is None else num_layers
    out = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = _rows(hybrid_sd["embed.tok.weight"], tp_rank, tp_size)
    for i in range(n):
        g = first_layer + i
        src, dst = f"blocks.{g}.", f"decoder.layers.{i}."
        mix = src + "mixer."
        kind = m.layer_types[g]
        fused = FUSED[kind](hybrid_sd, mix, m)
        out[dst + "input_layernorm.weight"] = hybrid_sd[src + "norm1.weight"]
        out[dst + f"self_attention.{FUSED_NAME[kind]}.weight"] = _rows(fused, tp_rank, tp_size)
        out[dst + "self_attention.linear_proj.weight"] = _cols(hybrid_sd[mix + "o_proj.weight"], tp_rank, tp_size)
        if kind != "F":
            out[dst + "self_attention.out_norm.weight"] = hybrid_sd[mix + "out_norm.weight"]
        for name in HEAD_PARAMS.get(kind, ()):  # per-head tensors: this rank's heads
            out[dst + f"self_attention.{name}"] = _rows(hybrid_sd[mix + name], tp_rank, tp_size)
        out[dst + "pre_mlp_layernorm.weight"] = hybrid_sd[src + "norm2.weight"]
        # megatron's GLU fc1 holds [gate; up] per TP rank: silu(first half) * second half
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([_rows(hybrid_sd[src + "mlp.gate.weight"], tp_rank, tp_size),
                                                        _rows(hybrid_sd[src + "mlp.up.weight"], tp_rank, tp_size)])
        out[dst + "mlp.linear_fc2.weight"] = _cols(hybrid_sd[src + "mlp.down.weight"], tp_rank, tp_size)
    if post_process:
        out["decoder.final_layernorm.weight"] = hybrid_sd["head.norm.weight"]
        if not (share_embeddings and pre_process):
            out["output_layer.weight"] = _rows(hybrid_sd["head.out.weight"], tp_rank, tp_size)
    return {k: v.detach().clone() for k, v in out.items()}


def megatron_to_hybridlm_state_dict(megatron_sd: dict, model_cfg: ModelConfig) -> dict:
    """Inverse of :func:`hybridlm_to_megatron_state_dict` for a whole model on one TP rank (tp_size 1,
    every layer, embedding and head): a megatron ``GPTModel`` state dict -> a HybridLM state dict.

    The forward map only permutes, concatenates and slices entries, so it is inverted by running it
    on *labels*: every HybridLM entry gets a unique id (fp64, exact below 2^53), the map sends the ids
    where it sends the weights, and each weight is scattered back to the position its id names. One
    mapping to maintain (new layer types need only the forward map); a HybridLM entry the map never
    reads fails loudly. With tied embeddings ``head.out.weight`` is the embedding."""
    from dist_attn.model.hybrid import HybridLM
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HybridLM(model_cfg).state_dict().items()}
    tied = model_cfg.tie_embeddings
    names = [k for k in shapes if not (tied and k == "head.out.weight")]
    base, ids = 0, {}
    for k in names:
        n = shapes[k].numel()
        ids[k] = (torch.arange(n, dtype=torch.float64) + base).view(shapes[k])
        base += n
    if tied:
        ids["head.out.weight"] = ids["embed.tok.weight"]
    labels = hybridlm_to_megatron_state_dict(ids, model_cfg, share_embeddings=tied)
    dtype = next(iter(megatron_sd.values())).dtype
    flat = torch.empty(base, dtype=dtype)
    seen = torch.zeros(base, dtype=torch.bool)
    for key, lab in labels.items():
        if key not in megatron_sd:
            raise KeyError(f"megatron state dict lacks {key}")
        idx = lab.reshape(-1).long()
        flat[idx] = megatron_sd[key].reshape(-1).to(dtype)
        seen[idx] = True
    assert bool(seen.all()), "the HybridLM -> megatron map does not read every HybridLM entry"
    out, at = {}, 0
    for k in names:
        n = shapes[k].numel()
        out[k] = flat[at:at + n].view(shapes[k]).clone()
        at += n
    if tied:
        out["head.out.weight"] = out["embed.tok.weight"]
    return out
