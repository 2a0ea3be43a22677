"""The hybrid language model: embedding, a stack of (linear | softmax) attention + SwiGLU blocks, head.

    model = HybridLM(cfg, cp)                          # cp = CPContext(...) or CPContext() (no CP)
    logits = model(input_ids, position_ids)            # [B, S/P] long, [B, S/P] or [S/P] -> [B, S/P, V]
    logits = model(input_ids, position_ids, cu_seqlens=cu)   # packed documents (global offsets)
    loss_sum, n_tokens = model.loss_sum(logits, labels)

Under CP every rank holds a full replica of the parameters and a shard of each sequence (layout
from ``cp.layout``; ``position_ids`` are the *global* positions of the shard's tokens). The global
mean loss is ``all_reduce(loss_sum) / all_reduce(n_tokens)`` over the CP and DP ranks, so the
trainer weighs every token equally however the labelled tokens fall on the shards.

The model is a chain of stages, each mapping a tuple ``(hidden, position_ids[, cu_seqlens])`` to the
next, which :meth:`HybridLM.pipeline_layers` exposes for a DeepSpeed ``PipelineModule``; ``forward``
runs the same chain, so the pipelined and plain models compute the same function. ``cu_seqlens``
(packed documents: GLOBAL document offsets ``[0, e_1, ..., S]``) rides along the tuple to every mixer,
which passes it to the attention only when it is given (see :mod:`dist_attn.model.mixers`).

Memory (``model.set_memory(recompute=, offload=)`` and the engines' loss, from ``trainer.recompute`` /
``trainer.offload`` / ``trainer.loss_chunk``). Per block, with ``torch.utils.checkpoint`` (non-reentrant):

* ``none``: autograd keeps every activation (inputs of the norms, projections, attention, gates, SwiGLU).
* ``selective``: the block keeps its input ``h`` and, inside the mixer, the attention inputs and outputs
  (q/k/v after RoPE, the output with its LSE or the linear states) and the output gate and projection
  inputs; it drops and recomputes in backward the two RMSNorms (``norm1``'s output, i.e. the input of
  the q/k/v/gate projections, is dropped after the forward and rebuilt from ``h`` when the
  projections' backward asks for it) and the whole MLP sub-block ``h + mlp(norm2(h))`` (its gate/up
  outputs, silu and product: 3 x ffn_hidden values per token). Nothing communicates again.
* ``full``: the block keeps only its input ``h [B, S/P, d]`` and runs again in backward. Every CP
  strategy inside it replays its communication (ring P2P, all-gathers, Ulysses all-to-alls, LASP-2 /
  gated-delta state exchanges): all ranks of a CP group recompute the same blocks in the same order
  (the backward walks the blocks in reverse on every rank), so the recomputed collectives match.
  Saving the strategies' gathered K/V or states instead would keep O(S) (ring, all-gather) bytes per
  layer, what ``full`` exists to drop. ``offload=True`` keeps that one input in host memory.
* ``loss_chunk=N``: the last stage returns the normed hidden states (``forward(..., return_hidden=True)``)
  and :func:`chunked_loss` runs the output projection and cross entropy over chunks of N tokens, each
  chunk's ``[N, V]`` logits recomputed in its backward: the ``[S/P, V]`` logits never exist at once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dist_attn.context import CPContext
from dist_attn.layout import check_seq_len
from dist_attn.model.config import ModelConfig
from dist_attn.model.layers import MIXERS, RMSNorm, SwiGLU, init_linear
from dist_attn.plan import check_model_heads

# torch modules known to act on each token independently (never mix across the sequence)
POINTWISE_TORCH = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Identity, nn.SiLU, nn.GELU,
                   nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ModuleList, nn.ModuleDict, nn.Sequential)
if hasattr(nn, "RMSNorm"):
    POINTWISE_TORCH = POINTWISE_TORCH + (nn.RMSNorm,)


def check_cp_awareness(model: nn.Module) -> None:
    """Refuse any sub-module that could mix tokens without reaching the other CP ranks.

    A module passes if it is a known pointwise torch module, or declares ``token_mixing = False``,
    or declares ``token_mixing = True`` *and* ``cp_aware = True``. Anything else (a convolution over
    the sequence, an unmarked custom layer) would silently see only this rank's shard: ValueError.
    Purely local, so it runs before any collective and raises on every rank alike.
    """
    for name, mod in model.named_modules():
        mixing = getattr(type(mod), "token_mixing", None)
        if mixing is None and isinstance(mod, POINTWISE_TORCH):
            continue
        if mixing is False:
            continue
        if mixing is True and getattr(type(mod), "cp_aware", False):
            continue
        what = "mixes tokens but is not CP-aware" if mixing else "is not known to be pointwise over tokens"
        raise ValueError(
            f"HybridLM with context parallelism: expected every module to be pointwise over tokens or a "
            f"CP-aware sequence mixer, got {name or 'model'!r} ({type(mod).__name__}), which {what}; under CP "
            f"it would run on this rank's shard only. Fix: route its sequence mixing through "
            f"dist_attn.dispatch and set `token_mixing = True; cp_aware = True` on the class, or, if it acts "
            f"per token, set `token_mixing = False`.")


def _ulysses_degree(cp: CPContext, strategy: str) -> int:
    if strategy == "usp":
        return dist.get_world_size(cp.ulysses_group) if cp.ulysses_group is not None else 1
    return cp.world_size if strategy == "ulysses" else 1


def check_heads_for_cp(cfg: ModelConfig, cp: CPContext) -> None:
    """Head-sharding strategies (Ulysses, the Ulysses part of USP) split heads over U ranks: the
    plan's rule (:func:`dist_attn.plan.check_model_heads`) with the degrees of this CP context's groups."""
    check_model_heads(cfg, softmax_cp=cp.softmax_strategy, softmax_degree=_ulysses_degree(cp, cp.softmax_strategy),
                      linear_cp=cp.linear_strategy, linear_degree=_ulysses_degree(cp, cp.linear_strategy),
                      prefix="HybridLM: model.")


class EmbeddingStage(nn.Module):
    """``(input_ids [B, S/P] long, position_ids[, cu_seqlens]) -> (hidden [B, S/P, d], position_ids[, ...])``."""
    token_mixing = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, inputs):
        input_ids, *rest = inputs
        return (self.tok(input_ids), *rest)


RECOMPUTE_MODES = ("none", "selective", "full")


def _checkpoint(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class _DropAndRecompute:
    """Saved-tensor hooks that drop every tensor autograd saves which lives in ``out``'s storage
    (e.g. a norm's output saved by the projections reading it) and rebuild it in backward from
    ``make()``, once, when the first of them is unpacked. Other saved tensors pass through."""

    def __init__(self, out: torch.Tensor, make):
        self.ptr, self.make, self.value = out.untyped_storage().data_ptr(), make, None

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() == self.ptr:
            return (self, t.shape, t.stride(), t.storage_offset())
        return t

    @staticmethod
    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        self, shape, stride, offset = packed
        if self.value is None:
            with torch.no_grad():
                self.value = self.make()
        return self.value.as_strided(shape, stride, offset)


class Block(nn.Module):
    """Pre-norm residual block: h += mixer(norm(h)); h += mlp(norm(h)). Tuple in, tuple out.

    ``recompute`` (``none | selective | full``) and ``offload``: what the block keeps for the backward,
    see the module docstring; set through :meth:`HybridLM.set_memory`."""
    token_mixing = False  # the mixer is a sub-module and is checked on its own
    recompute = "none"
    offload = False

    def __init__(self, cfg: ModelConfig, kind: str, cp: CPContext, mixers: dict):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixers[kind](cfg, cp)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def _mlp_part(self, h):
        return h + self.mlp(self.norm2(h))

    def _block(self, h, position_ids, *docs):
        # pass cu_seqlens only when given: mixers written without packed documents keep working
        h = h + self.mixer(self.norm1(h), position_ids, *docs)
        return self._mlp_part(h)

    def _selective(self, h, position_ids, *docs):
        x = _checkpoint(self.norm1, h)                      # keeps h, not the norm's internals
        hooks = _DropAndRecompute(x, lambda: self.norm1(h))  # the projections' saved input: rebuilt
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            m = self.mixer(x, position_ids, *docs)
        return _checkpoint(self._mlp_part, h + m)           # keeps h + m only

    def _full(self, h, position_ids, *docs):
        if not self.offload:
            return _checkpoint(self._block, h, position_ids, *docs)
        # the one saved tensor, the block input, goes to host memory (pinned on GPU: no host sync)
        device = h.device  # not h itself: the closure must not keep the device copy alive
        host = torch.empty(h.shape, dtype=h.dtype, pin_memory=h.is_cuda)
        host.copy_(h, non_blocking=True)
        return _checkpoint(lambda hh, *a: self._block(hh.to(device, non_blocking=True), *a),
                           host, position_ids, *docs)

    def forward(self, inputs):
        h, position_ids, *docs = inputs  # docs: [] or [cu_seqlens]
        mode = self.recompute if torch.is_grad_enabled() else "none"
        if mode == "full":
            h = self._full(h, position_ids, *docs)
        elif mode == "selective":
            h = self._selective(h, position_ids, *docs)
        else:
            h = self._block(h, position_ids, *docs)
        return (h, position_ids, *docs)


class HeadStage(nn.Module):
    """``(hidden, position_ids[, cu_seqlens]) -> logits [B, S/P, V]`` (final RMSNorm + output projection)."""
    token_mixing = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, inputs, return_hidden: bool = False):
        h = self.norm(inputs[0])
        return h if return_hidden else self.out(h)


class HiddenHead(nn.Module):
    """The head stage without its output projection, for pipelines with a chunked loss:
    ``(hidden, ...) -> norm(hidden) [B, S/P, d]``. Shares the head's modules."""
    token_mixing = False

    def __init__(self, head: HeadStage):
        super().__init__()
        self.head = head

    def forward(self, inputs):
        return self.head(inputs, return_hidden=True)


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """One chunk: logits ``[n, V] = h W^T`` in fp32 -> (summed CE, greedy hits over labelled tokens)."""
    logits = F.linear(h, weight).float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():
        hits = ((logits.argmax(dim=-1) == labels) & (labels != ignore_index)).sum()
    return loss, hits


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                 ignore_index: int = -100, chunk_fn=None):
    """Summed cross entropy of ``hidden [B, S/P, d] @ weight[V, d]^T`` against ``labels [B, S/P]``,
    ``chunk`` tokens at a time -> ``(loss_sum fp32, n_tokens, hits)`` (hits: greedy predictions equal
    to the label, for MQAR recall).

    Each chunk runs under a non-reentrant checkpoint that keeps only its slice of ``hidden`` (a view)
    and the weight: its ``[chunk, V]`` logits are freed after the forward and recomputed in the
    chunk's backward, where they give the chunk's slice of d(hidden) and add to d(weight). Peak
    logits memory: one chunk, forward and backward. ``chunk_fn(h, weight, labels, ignore_index)``
    replaces the per-chunk math (the megatron engine passes its vocab-parallel version)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_loss: expected labels of shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}. Fix: shard labels with the same layout as input_ids.")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_loss: expected a positive chunk size, got {chunk!r}. Fix: pass "
                         f"trainer.loss_chunk >= 1 (0 turns chunking off upstream).")
    fn = chunk_fn or _chunk_ce
    h, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    loss = hits = None
    for i in range(0, h.shape[0], chunk):
        part = lab[i:i + chunk]
        li, hi = checkpoint(fn, h[i:i + chunk], weight, part, ignore_index, use_reentrant=False) \
            if torch.is_grad_enabled() else fn(h[i:i + chunk], weight, part, ignore_index)
        loss, hits = (li, hi) if loss is None else (loss + li, hits + hi)
    return loss, (labels != ignore_index).sum(), hits


class HybridLM(nn.Module):
    """Decoder-only hybrid LM. ``MIXERS`` maps pattern letters to mixer classes (tests override it)."""
    MIXERS = MIXERS
    token_mixing = False  # a container: its blocks' mixers are checked one by one

    def __init__(self, cfg: ModelConfig, cp: CPContext = CPContext()):
        super().__init__()
        self.cfg = cfg.validate()
        self.cp = cp
        self.embed = EmbeddingStage(cfg)
        self.blocks = nn.ModuleList([Block(cfg, t, cp, self.MIXERS) for t in cfg.layer_types])
        self.head = HeadStage(cfg)
        # init in module order from the global RNG: torch.manual_seed(s) fixes every parameter
        self.apply(lambda m: init_linear(m, cfg.init_std, cfg.n_layers))
        if cfg.tie_embeddings:
            self.head.out.weight = self.embed.tok.weight
        self._cp_checked = False
        if cp.enabled:
            self._check_cp()

    def _check_cp(self) -> None:
        check_heads_for_cp(self.cfg, self.cp)
        check_cp_awareness(self)
        self._cp_checked = True

    def set_memory(self, recompute: str = "none", offload: bool = False) -> "HybridLM":
        """Activation recomputation of every block (``none | selective | full``, see the module
        docstring); ``offload`` (full only) keeps the saved block inputs in host memory."""
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"HybridLM.set_memory: expected recompute in {RECOMPUTE_MODES}, got {recompute!r}. "
                             f"Fix: set trainer.recompute to one of them.")
        if offload and recompute != "full":
            raise ValueError(f"HybridLM.set_memory: expected offload only with recompute='full', got "
                             f"recompute={recompute!r}. Fix: set trainer.recompute=full or trainer.offload=false.")
        for b in self.blocks:
            b.recompute, b.offload = recompute, offload
        return self

    def pipeline_layers(self, return_hidden: bool = False) -> list:
        """``[embedding stage, block_0, ..., block_{n-1}, head stage]``; each maps a tuple
        ``(hidden, position_ids)`` to the next (the first takes ``(input_ids, position_ids)``, the
        last returns logits, or the normed hidden states with ``return_hidden``: a chunked loss).
        Shared modules, not copies. With ``tie_embeddings`` the first and last
        stage share one weight: a pipeline that puts them on different stages must tie them itself."""
        return [self.embed, *self.blocks, HiddenHead(self.head) if return_hidden else self.head]

    def loss_chunked(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int = -100):
        """:func:`chunked_loss` with the output weight: ``hidden`` from ``forward(..., return_hidden=True)``."""
        return chunked_loss(hidden, self.head.out.weight, labels, chunk, ignore_index)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """``input_ids [B, S/P]`` long, ``position_ids [B, S/P]`` or ``[S/P]`` (global positions, or
        positions restarting per document), ``cu_seqlens`` None or the GLOBAL document offsets
        ``[0, e_1, ..., S]`` (1-D int, the same on every CP rank) -> logits ``[B, S/P, V]``, or with
        ``return_hidden`` the final-normed hidden states ``[B, S/P, d]`` (for :meth:`loss_chunked`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"HybridLM.forward: expected input_ids of shape [B, S/P], got "
                             f"{tuple(input_ids.shape)}. Fix: add the batch dimension.")
        if position_ids.shape[-1] != input_ids.shape[1] or position_ids.dim() not in (1, 2):
            raise ValueError(f"HybridLM.forward: expected position_ids [B, S/P] or [S/P] matching input_ids "
                             f"{tuple(input_ids.shape)}, got {tuple(position_ids.shape)}. Fix: take them from "
                             f"dist_attn.data.sharding.shard_batch (global positions of this shard).")
        p = self.cp.world_size
        s_global = input_ids.shape[1] * p
        if s_global > self.cfg.max_seq_len:
            raise ValueError(f"HybridLM.forward: expected a global sequence length <= max_seq_len="
                             f"{self.cfg.max_seq_len}, got {s_global}. Fix: raise model.max_seq_len.")
        if p > 1:
            if not self._cp_checked:  # modules may have been swapped after construction
                self._check_cp()
            check_seq_len(s_global, p, self.cp.layout, "HybridLM.forward")
        x = (input_ids, position_ids) if cu_seqlens is None else (input_ids, position_ids, cu_seqlens)
        for stage in self.pipeline_layers(return_hidden):
            x = stage(x)
        return x

    @staticmethod
    def loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
        """Summed next-token cross-entropy over the labelled tokens of this shard.

        ``logits [B, S/P, V]``, ``labels [B, S/P]`` (already shifted: labels[t] is the token after
        position t, see :mod:`dist_attn.data.sharding`) -> ``(loss_sum fp32 scalar, n_tokens long
        scalar)``. Summing both over CP and DP ranks and dividing gives the global per-token mean.
        """
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"HybridLM.loss_sum: expected labels of shape {tuple(logits.shape[:-1])}, got "
                             f"{tuple(labels.shape)}. Fix: shard labels with the same layout as input_ids.")
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=ignore_index, reduction="sum")
        return loss, (labels != ignore_index).sum()

    def num_params(self) -> int:
        """Number of distinct parameters (tied weights counted once); equals ``cfg.num_params()``."""
        return sum(p.numel() for p in self.parameters())

    # model files and decoding: thin entry points, implemented in dist_attn.model.io / .generate
    def save_pretrained(self, directory: str, *, tokenizer=None, dtype=None) -> str:
        """``config.json`` + ``model.safetensors`` (+ tokenizer) in ``directory``; see :mod:`dist_attn.model.io`."""
        from dist_attn.model.io import save_pretrained
        return save_pretrained(self, directory, tokenizer=tokenizer, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None, dtype=None) -> "HybridLM":
        """A model saved by :meth:`save_pretrained` or ``launchers.export``: no engine, no process group, CP off."""
        from dist_attn.model.io import from_pretrained
        return from_pretrained(directory, device=device, dtype=dtype, cls=cls)

    def generate(self, input_ids, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Incremental decoding (recurrent state / KV cache); see :func:`dist_attn.model.generate.generate`."""
        from dist_attn.model.generate import generate
        return generate(self, input_ids, max_new_tokens, **sampling)
