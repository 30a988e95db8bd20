"""The ``hf_vram_varlen`` attention: what hf_vram models attend with inside Transformers' continuous batching.

Transformers' continuous batching runs SDPA over the whole packed batch with a block-diagonal mask it builds every
step (``[max_batch_tokens, max_tokens_read + max_batch_tokens]`` in the model dtype, allocated up front) and, on
the CPU, K/V repeated to the query-head count; its cost grows with (tokens this step) x (tokens read by every
request). This attention takes the packed K/V the cache returns (model-dtype or hf_vram's dequantized pages) and the
cumulative lengths Transformers passes to flash-attention implementations (``cu_seq_lens_q`` / ``cu_seq_lens_k``),
and attends per sequence (``hf_vram.kernels.varlen_attention``). A name without "flash" keeps Transformers from
importing flash-attention packages for it; since continuous batching admits only SDPA, eager and flash names, the
guard (``hf_vram.kvcache.continuous``) switches to it after the manager is built, and the batch then builds no mask
(``attn_mask_is_needed`` is False for it). A call outside continuous batching (no cumulative lengths) is plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_vram.kernels.varlen_attention import varlen_attention
from hf_vram.kvcache.paged_decodes import PAGED_DECODES, attend_paged_decodes
from hf_vram.kvcache.value_rotation import VALUE_ROTATION, rotate

NAME = "hf_vram_varlen"


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a model's attention cannot run here (logit soft-capping, learned attention sinks), or None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if any(getattr(module, "sinks", None) is not None for module in model.modules()):
        return "attention sinks"
    return None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function contract: ``[1, heads, Q, d]`` queries, ``[1, kv_heads, K, d]`` K/V;
    returns ``([1, Q, heads, d], None)``. Values that int4/int2 pages hand over turned (``value_rotation``, the
    matrix under ``VALUE_ROTATION``) give an output turned the same way, which is turned back here."""
    rotation = kwargs.pop(VALUE_ROTATION, None)
    out, _ = _attend(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
    return (out if rotation is None else rotate(out, rotation)), None


def _attend(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention itself: per sequence, the decodes handed over as pages from them, plain SDPA outside batching."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    paged_decodes = kwargs.pop(PAGED_DECODES, None)
    if cu_q is None or not isinstance(cu_k, torch.Tensor) or attention_mask is not None:
        if paged_decodes is not None:  # the decodes' K/V were left in the pages: only this function reads them
            raise ValueError(
                "hf_vram: a step's decodes were handed over as quantized pages but this attention call has a mask or no "
                "sequence lengths; run continuous batching through hf_vram (HF_VRAM_CPU_KERNELS=0 turns the handover off)."
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError(
            "hf_vram: this model's attention uses logit soft-capping or attention sinks, which the hf_vram_varlen "
            "attention does not compute; run continuous batching with attn_implementation='sdpa' and "
            "fusion.attention off."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if paged_decodes is None:
        return varlen_attention(query, key, value, cu_q, cu_k, scale, sliding_window).transpose(1, 2).contiguous(), None
    if sliding_window is not None:
        raise ValueError("hf_vram: quantized pages handed decodes to a sliding-window layer, which reads its own pages.")
    out = varlen_attention(query, key, value, cu_q, cu_k, scale, None, paged_decodes.plan.query_row_set)
    attend_paged_decodes(query, out, paged_decodes, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)


register()
