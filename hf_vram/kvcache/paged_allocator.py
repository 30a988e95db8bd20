"""int8 K/V pages inside Transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``): rows of
``KVCodec`` bytes (a scale per token and head) in ``RowAllocator``'s layout. Writes quantize the new tokens only;
reads dequantize only the rows read, never a layer's whole history. ``quantized_allocator`` also hands out the
int4/int2 allocators (``hf_vram.kvcache.windowed_allocator``).
"""

from __future__ import annotations

import functools

import torch

from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import WINDOWED_BITS
from hf_vram.kvcache.paged_decodes import DecodePlan, PagedDecodes, decode_plan, fresh_states, read_others
from hf_vram.kvcache.row_allocator import RowAllocator
from hf_vram.kvcache.windowed_allocator import windowed_allocator


class QuantizedFullAttentionAllocator(RowAllocator):
    """``RowAllocator`` over ``KVCodec`` rows; ``bits`` is set by ``quantized_allocator``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_codec = KVCodec(self.bits, self.num_key_value_heads, self.head_dim)
        self.value_codec = KVCodec(self.bits, self.num_key_value_heads, self.head_dim)
        self._plan: DecodePlan | None = None  # this step's decodes, ``update_deferring_decodes``

    @classmethod
    def row_bytes_for(cls, num_key_value_heads: int, head_dim: int) -> int:
        return KVCodec(cls.bits, num_key_value_heads, head_dim).row_bytes

    def update(
        self,
        key_states: torch.Tensor,  # [seqlen_q, num_kv_heads, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,  # [past_length + seqlen_q]
        write_index: torch.Tensor,  # [seqlen_q]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and write the new tokens, then read and dequantize the rows the attention needs. A batch with no
        cache reads (prefills only) attends to the new states as computed, like the float allocator; in other batches the
        new tokens are read as computed too (``as_computed``)."""
        key_rows, value_rows = self._row_views[layer_idx]
        key_rows.index_copy_(0, write_index, self.key_codec.encode(key_states))
        value_rows.index_copy_(0, write_index, self.value_codec.encode(value_states))
        if read_index.numel() == 0:
            return key_states, value_states
        keys = self.key_codec.decode(key_rows.index_select(0, read_index), key_states.dtype)
        values = self.value_codec.decode(value_rows.index_select(0, read_index), value_states.dtype)
        return self.as_computed(layer_idx, (keys, values), (key_states, value_states), read_index, write_index)

    def update_deferring_decodes(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,
        write_index: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, PagedDecodes | None]:
        """``update`` for an attention that runs the decodes from the pages (``hf_vram.kvcache.paged_decodes``):
        the same writes, the other sequences' K/V read as ``update`` reads them, the decodes' slots left unfilled,
        and what the attention needs for them (None when the step has none: then exactly ``update``)."""
        if layer_idx == self.layer_indices[0]:  # every layer of a step reads and writes the same rows
            self._plan = decode_plan(cu_seqlens_q, cu_seqlens_k, read_index)
        plan = self._plan
        if plan is None:
            return (*self.update(key_states, value_states, layer_idx, read_index, write_index), None)
        key_rows, value_rows = self._row_views[layer_idx]
        key_rows.index_copy_(0, write_index, self.key_codec.encode(key_states))
        value_rows.index_copy_(0, write_index, self.value_codec.encode(value_states))

        def read(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(
                codec.decode(page.index_select(0, rows), key_states.dtype)
                for page, codec in ((key_rows, self.key_codec), (value_rows, self.value_codec))
            )

        states = (key_states, value_states)
        keys, values = self.as_computed(layer_idx, read_others(plan, states, read), states, read_index, write_index)
        return keys, values, PagedDecodes(plan, key_rows, value_rows, *fresh_states(plan, *states))


@functools.cache
def quantized_allocator(bits: int) -> type[RowAllocator]:
    """The allocator class for ``bits``-bit K/V: per-token rows for 8 bits, KIVI-style rows and a window for 4 and 2
    (``hf_vram.kvcache.windowed_allocator``)."""
    if bits in WINDOWED_BITS:
        return windowed_allocator(bits)
    return type(f"Int{bits}FullAttentionAllocator", (QuantizedFullAttentionAllocator,), {"bits": bits})
