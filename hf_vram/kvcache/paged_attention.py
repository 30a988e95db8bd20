"""The ``hf_vram_paged`` attention: decode steps read K/V straight from the pool through the Triton kernel.

Opt in with ``from_pretrained(..., attn_implementation="hf_vram_paged")`` (or ``model.set_attn_implementation``)
and ``PooledKVCache(pool, paged_attention=True)``. On a decode step (one query token) the cache then skips the
gather, and hands this function the block tables instead; every other call (prefill, no pooled cache) is plain SDPA
with Transformers' SDPA mask, except a prefill chunk after a pooled history, which reads that history from the pool
in place (``hf_vram.kernels.history_attention``). The pairing is checked: a paged step that the attention function did not consume
(the model runs another attention) raises at the next layer instead of computing with a partial cache.
Sliding-window layers are not paged (the kernel attends to the whole sequence), so they keep the gather path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_vram.kernels.history_attention import attend, take_history
from hf_vram.kernels.triton_paged import paged_decode_triton

NAME = "hf_vram_paged"
_LOCAL = threading.local()


@dataclass
class PagedStep:
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None
    value_scales: torch.Tensor | None
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    block_size: int
    consumed: bool = False


def set_step(step: PagedStep | None) -> None:
    previous = getattr(_LOCAL, "step", None)
    if previous is not None and not previous.consumed:
        _LOCAL.step = None
        raise RuntimeError(
            "hf_vram: PooledKVCache(paged_attention=True) handed layer "
            f"{previous.layer} its block tables, but the model's attention did not read them; load the model with "
            f"attn_implementation='{NAME}' or create the cache with paged_attention=False."
        )
    _LOCAL.step = step


def clear_step() -> None:
    _LOCAL.step = None


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    history = take_history(module)  # a prefill chunk: its history read from the pool in place
    if history is not None:
        return attend(history, query, key, value, attention_mask, scaling), None
    step = getattr(_LOCAL, "step", None)
    if step is None or step.consumed or query.shape[2] != 1 or step.layer != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    step.consumed = True
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_decode_triton(
        query[:, :, 0],
        step.keys,
        step.values,
        step.block_tables,
        step.seq_lens,
        step.block_size,
        scale,
        step.key_scales,
        step.value_scales,
    )
    return out[:, None].to(query.dtype), None


def register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, paged_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)


register()  # on import: a saved model naming this attention finds it (hf_vram.hf.registration)
