"""hf_vram's attention functions in Transformers' registries: what ``attn_implementation`` names resolve to."""

from __future__ import annotations

from collections.abc import Callable

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface


def register_attention(name: str, forward: Callable, mask: Callable) -> None:
    """Register ``forward`` and the mask function the model builds for it under ``name``, once (a module imported
    again, or a saved model naming the attention, finds it there)."""
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, mask)
