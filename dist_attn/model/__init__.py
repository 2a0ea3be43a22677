"""The hybrid (linear + softmax attention) language model trained by dist_attn.

* :class:`ModelConfig` -- sizes, layer pattern (``"LLLF"``), parameter and FLOP counts.
* :class:`HybridLM` -- ``forward(input_ids, position_ids) -> logits``, ``loss_sum``, ``pipeline_layers``.
* :mod:`dist_attn.model.layers` -- RMSNorm, SwiGLU, RoPE, SoftmaxAttention, LinearAttention.
"""
from dist_attn.model.config import ModelConfig
from dist_attn.model.hybrid import HybridLM, check_cp_awareness

__all__ = ["ModelConfig", "HybridLM", "check_cp_awareness"]
