"""Incremental decoding of a :class:`~dist_attn.model.hybrid.HybridLM`: a recurrent state per linear
layer (constant memory and time per token -- the point of a hybrid), a KV cache per softmax layer.

    logits, cache = prefill(model, prompt_ids)        # [B, S] -> logits [B, S, V], the cache after S tokens
    logits = step(model, next_ids, cache)             # [B] -> [B, V]; the cache advances by one token
    new_ids = generate(model, prompt_ids, 32, greedy=True)                       # [B, 32]
    new_ids = generate(model, prompt_ids, 32, greedy=False, temperature=0.8, top_p=0.9, seed=0)

Per-layer decode protocol. Every sequence mixer class has a :class:`MixerDecoder` registered for it
(:func:`register_decoder`, looked up along the class's MRO), with three methods on tensors of width d:

* ``init_state(mixer, batch, device, dtype)`` -- the state before any token;
* ``prefill(mixer, x [B, S, d], position_ids [S]) -> (y [B, S, d], state)`` -- the layer's own full
  forward (same kernels, so ``y`` is the training forward's output) that also returns its state;
* ``step(mixer, x [B, 1, d], position int, state) -> (y [B, 1, d], state)`` -- one more token.

Stepping every token from ``init_state`` must give the prefill's outputs (tests check both paths). A
new layer type (e.g. Gated DeltaNet ``D``: delta-rule state plus its short-conv window) registers its
decoder next to its module with ``@register_decoder(TheModule)``.

Math of the built-in mixers (``dist_attn.model.mixers``), per head:

* linear ``L``, ``G`` and Gated DeltaNet ``D``: :mod:`dist_attn.model.decode_linear` (a recurrent state;
  prefill takes the kernel's final state, the state the training forward reaches).
* softmax ``F``: RoPE at position t on q_t and k_t; the cache keeps K after RoPE and V
  (``[B, capacity, Hkv, D]``, doubled when full: amortised O(1) appends); ``o_t = softmax(q_t K^T /
  sqrt(D)) V`` over the t+1 cached keys (GQA: query head j reads KV head j // (Hq/Hkv)), fp32
  scores, then the head-wise gate.

No context parallelism here: a model built with a CP context is refused (load it with
``HybridLM.from_pretrained``, which builds CP off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from dist_attn.checks import fail
from dist_attn.context import CPContext
from dist_attn.model.layers import SoftmaxAttention
from dist_attn.model.mixers import apply_rope, softmax_out

__all__ = ["MixerDecoder", "register_decoder", "decoder_for", "DecodeCache", "prefill", "step", "generate",
           "greedy_by_full_forward", "sample_next"]

_DECODERS: dict = {}


class MixerDecoder:
    """The decode protocol of one mixer type (see the module docstring)."""

    def init_state(self, mixer, batch: int, device, dtype) -> Any:
        raise NotImplementedError

    def prefill(self, mixer, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, mixer, x: torch.Tensor, position: int, state) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError


def register_decoder(module_cls):
    """Class decorator: ``@register_decoder(LinearAttention) class LinearDecoder(MixerDecoder): ...``."""
    def wrap(decoder_cls):
        _DECODERS[module_cls] = decoder_cls()
        return decoder_cls
    return wrap


def decoder_for(mixer) -> MixerDecoder:
    for cls in type(mixer).__mro__:
        if cls in _DECODERS:
            return _DECODERS[cls]
    fail("dist_attn.model.generate", f"a sequence mixer with a registered decoder ({sorted(c.__name__ for c in _DECODERS)})",
         type(mixer).__name__, "register one with @dist_attn.model.generate.register_decoder(ItsClass)")


# ---------------------------------------------------------------------------- softmax attention (F)

@dataclass
class KVCache:
    """K (after RoPE) and V of the tokens so far: ``k, v [B, capacity, Hkv, D]``, ``length`` filled."""
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        if self.length + n > self.k.shape[1]:  # grow geometrically: amortised O(1) per token
            cap = max(2 * self.k.shape[1], self.length + n, 16)
            grow = lambda t: torch.cat([t[:, :self.length], t.new_empty(t.shape[0], cap - self.length,
                                                                         *t.shape[2:])], dim=1)
            self.k, self.v = grow(self.k), grow(self.v)
        self.k[:, self.length:self.length + n] = k
        self.v[:, self.length:self.length + n] = v
        self.length += n

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :self.length], self.v[:, :self.length]


def _softmax_qkv(m: SoftmaxAttention, x: torch.Tensor, positions: torch.Tensor):
    b, s, _ = x.shape
    q = apply_rope(m.q_proj(x).view(b, s, m.hq, m.hd), positions, m.theta)
    k = apply_rope(m.k_proj(x).view(b, s, m.hkv, m.hd), positions, m.theta)
    return q, k, m.v_proj(x).view(b, s, m.hkv, m.hd)


def _softmax_out(m: SoftmaxAttention, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b, s = x.shape[:2]
    o = softmax_out(o, None if m.gate is None else m.gate(x))  # one gate per head and token
    return m.o_proj(o.reshape(b, s, m.hq * m.hd))


@register_decoder(SoftmaxAttention)
class SoftmaxDecoder(MixerDecoder):
    """State: a :class:`KVCache`."""

    def init_state(self, m, batch, device, dtype):
        empty = torch.empty(batch, 0, m.hkv, m.hd, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def prefill(self, m, x, position_ids):
        from dist_attn import dispatch
        q, k, v = _softmax_qkv(m, x, position_ids)
        o = dispatch.softmax_attention(q, k, v, cp=m.cp, causal=True,  # the training forward's kernel
                                       window_size=getattr(m, "window_size", None))
        cache = self.init_state(m, x.shape[0], x.device, k.dtype)
        cache.append(k, v)
        return _softmax_out(m, o, x), cache

    def step(self, m, x, position, cache):
        b = x.shape[0]
        q, k, v = _softmax_qkv(m, x, torch.tensor([position], device=x.device))
        cache.append(k, v)
        kk, vv = cache.view()                                                      # [B, n, Hkv, D]
        w = getattr(m, "window_size", None)
        if w is not None:  # sliding window: cache slot j holds position j; keep j >= position - W
            kk, vv = kk[:, max(0, kk.shape[1] - (w + 1)):], vv[:, max(0, vv.shape[1] - (w + 1)):]
        acc = torch.promote_types(q.dtype, torch.float32)
        r = m.hq // m.hkv
        qg = q.view(b, m.hkv, r, m.hd).to(acc) * m.hd ** -0.5                     # [B, Hkv, r, D]
        scores = torch.einsum("bgrd,bngd->bgrn", qg, kk.to(acc))                   # [B, Hkv, r, n]
        o = torch.einsum("bgrn,bngd->bgrd", scores.softmax(dim=-1), vv.to(acc))    # [B, Hkv, r, D]
        return _softmax_out(m, o.reshape(b, 1, m.hq, m.hd).to(v.dtype), x), cache


# ---------------------------------------------------------------------------- the model

@dataclass
class DecodeCache:
    """One state per block (``layers[i]`` of block i's mixer) and the number of tokens consumed."""
    layers: list = field(default_factory=list)
    length: int = 0


def _check_model(model, batch: int, total: int) -> None:
    cp = getattr(model, "cp", CPContext())
    if cp.enabled:
        fail("generate", "a model without context parallelism", f"a CP context of {cp.world_size} ranks",
             "load the model with HybridLM.from_pretrained (CP off)")
    if total > model.cfg.max_seq_len:
        fail("generate", f"prompt + new tokens <= max_seq_len={model.cfg.max_seq_len}", total,
             "shorten the prompt or --max-new-tokens")
    if batch < 1:
        fail("generate", "at least one sequence", batch, "pass input_ids [B, S] with B >= 1")


def _blocks(model):
    for blk in model.blocks:
        for name in ("norm1", "mixer", "norm2", "mlp"):
            if not hasattr(blk, name):
                fail("generate", "pre-norm blocks (norm1, mixer, norm2, mlp)", f"{type(blk).__name__} without {name}",
                     "extend dist_attn.model.generate for the new block structure")
        yield blk


def _as_ids(model, input_ids) -> torch.Tensor:
    device = model.embed.tok.weight.device
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype not in (torch.long, torch.int32):
        fail("generate", "prompt ids [B, S] (int, S >= 1)", f"{tuple(input_ids.shape)} {input_ids.dtype}",
             "pass at least one prompt token per sequence")
    v = model.cfg.vocab_size
    if input_ids.device.type == "cpu" and (int(input_ids.min()) < 0 or int(input_ids.max()) >= v):
        fail("generate", f"prompt ids in [0, {v})", f"ids in [{int(input_ids.min())}, {int(input_ids.max())}]",
             "encode the prompt with the model's tokenizer")
    return input_ids.to(device=device, dtype=torch.long)


@torch.no_grad()
def prefill(model, input_ids) -> tuple[torch.Tensor, DecodeCache]:
    """Run the prompt ``[B, S]`` through the model: logits ``[B, S, V]`` (the full forward's) and the cache."""
    ids = _as_ids(model, input_ids)
    _check_model(model, ids.shape[0], ids.shape[1])
    pos = torch.arange(ids.shape[1], device=ids.device)
    h = model.embed.tok(ids)
    cache = DecodeCache(length=ids.shape[1])
    for blk in _blocks(model):
        y, state = decoder_for(blk.mixer).prefill(blk.mixer, blk.norm1(h), pos)
        h = h + y
        h = h + blk.mlp(blk.norm2(h))
        cache.layers.append(state)
    return model.head((h, pos)), cache


@torch.no_grad()
def step(model, token_ids, cache: DecodeCache) -> torch.Tensor:
    """Feed one token per sequence ``[B]`` at position ``cache.length``: logits ``[B, V]``."""
    ids = _as_ids(model, token_ids).reshape(-1, 1)
    _check_model(model, ids.shape[0], cache.length + 1)
    h = model.embed.tok(ids)                                                       # [B, 1, d]
    fresh = not cache.layers
    for i, blk in enumerate(_blocks(model)):
        dec = decoder_for(blk.mixer)
        if fresh:
            cache.layers.append(dec.init_state(blk.mixer, ids.shape[0], h.device, h.dtype))
        y, cache.layers[i] = dec.step(blk.mixer, blk.norm1(h), cache.length, cache.layers[i])
        h = h + y
        h = h + blk.mlp(blk.norm2(h))
    cache.length += 1
    return model.head((h, None))[:, 0]


def sample_next(logits: torch.Tensor, *, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens ``[B]`` from logits ``[B, V]``: argmax, or a draw from softmax(logits / T) restricted to
    the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p       # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(greedy, temperature, top_p, max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        fail("generate", "max_new_tokens >= 0", max_new_tokens, "pass a non-negative int")
    if not greedy:
        if not temperature > 0:
            fail("generate", "temperature > 0 for sampling", temperature, "use greedy=True for argmax decoding")
        if not 0 < top_p <= 1:
            fail("generate", "0 < top_p <= 1", top_p, "use top_p=1 to sample from the whole distribution")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None) -> torch.Tensor:
    """Continue each prompt of ``input_ids [B, S]`` (or one list of ids) by up to ``max_new_tokens``
    tokens: prefill, then one :func:`step` per token. Sampling draws from a generator seeded with
    ``seed`` (the same seed gives the same tokens). With ``eos_id`` a sequence that produced it keeps
    producing it, and decoding stops once every sequence has. Returns the new ids ``[B, N]``."""
    _check_sampling(greedy, temperature, top_p, max_new_tokens)
    ids = _as_ids(model, input_ids)
    _check_model(model, ids.shape[0], ids.shape[1] + max_new_tokens)
    gen = None
    if not greedy:
        gen = torch.Generator(device=ids.device)
        gen.manual_seed(0 if seed is None else seed)
    out = torch.empty(ids.shape[0], 0, dtype=torch.long, device=ids.device)
    if max_new_tokens == 0:
        return out
    logits, cache = prefill(model, ids)
    logits = logits[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=gen)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = step(model, nxt, cache)
    return out


@torch.no_grad()
def greedy_by_full_forward(model, input_ids, max_new_tokens: int) -> torch.Tensor:
    """The reference for :func:`generate`: a full forward over the whole sequence for every new token."""
    ids = _as_ids(model, input_ids)
    for _ in range(max_new_tokens):
        logits = model(ids, torch.arange(ids.shape[1], device=ids.device))
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, ids.shape[1] - max_new_tokens:]


# the recurrent mixers' decoders (L, G, D) register themselves on import
from dist_attn.model import decode_linear as _decode_linear  # noqa: E402,F401
