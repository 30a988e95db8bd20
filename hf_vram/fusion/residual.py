"""Residual add fused into the norm that follows it, in decoder layers whose forward is Llama's.

A decoder layer qualifies when its ``forward`` source (decorators, comments and blank lines aside) equals
Transformers' own ``LlamaDecoderLayer.forward`` (true of Mistral, Qwen2, Qwen3 and Gemma in 5.24, not of Phi-3) and
its ``post_attention_layernorm`` is a ``FusedRMSNorm``. Its forward is then replaced on the instance by the same
steps with ``residual + attention_output`` and the norm done by ``FusedRMSNorm.add_forward``: one Triton kernel on
CUDA that writes the sum once; the same arithmetic on the CPU. Other layers keep their forward.
"""

from __future__ import annotations

import inspect
import types

import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from hf_vram.fusion.norms import FusedRMSNorm


def _source(fn) -> str:
    lines = (line.strip() for line in inspect.getsource(fn).splitlines())
    return "\n".join(line for line in lines if line and not line.startswith(("@", "#")))


_LLAMA_LAYER = _source(LlamaDecoderLayer.forward)


def _fused_forward(
    self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs
):
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    residual, hidden_states = self.post_attention_layernorm.add_forward(hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def fuse_residual_adds(model: nn.Module) -> int:
    """Patch every qualifying decoder layer; returns how many were patched."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("DecoderLayer"):
            continue
        if not isinstance(getattr(module, "post_attention_layernorm", None), FusedRMSNorm):
            continue
        try:
            same = _source(type(module).forward) == _LLAMA_LAYER
        except (OSError, TypeError):
            same = False
        if same:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
