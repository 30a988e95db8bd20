"""int8 K/V pages inside Transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``): rows of
``KVCodec`` bytes (a scale per token and head) in ``RowAllocator``'s layout. Writes quantize the new tokens only;
reads dequantize only the rows read, never a layer's whole history. ``quantized_allocator`` also hands out the
int4/int2 allocators (``hf_vram.kvcache.windowed_allocator``).
"""

from __future__ import annotations

import functools

import torch

from hf_vram.kernels import kv_write
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import WINDOWED_BITS
from hf_vram.kvcache.row_allocator import RowAllocator
from hf_vram.kvcache.windowed_allocator import windowed_allocator


class QuantizedFullAttentionAllocator(RowAllocator):
    """``RowAllocator`` over ``KVCodec`` rows; ``bits`` is set by ``quantized_allocator``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_codec = KVCodec(self.bits, self.num_key_value_heads, self.head_dim)
        self.value_codec = KVCodec(self.bits, self.num_key_value_heads, self.head_dim)

    @classmethod
    def row_bytes_for(cls, num_key_value_heads: int, head_dim: int) -> int:
        return KVCodec(cls.bits, num_key_value_heads, head_dim).row_bytes

    def write_rows(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, write_index: torch.Tensor) -> None:
        """The new tokens quantized into their rows: by hf_vram's kernel where it is loaded (one pass), else torch."""
        if kv_write.takes(key_states):
            flat = self._rows.view(-1)
            for kv, states in enumerate((key_states, value_states)):
                kv_write.quantize_rows_int8(states, flat, self.row_byte_offsets(layer_idx, kv, write_index))
            return
        key_rows, value_rows = self._row_views[layer_idx]
        key_rows.index_copy_(0, write_index, self.key_codec.encode(key_states))
        value_rows.index_copy_(0, write_index, self.value_codec.encode(value_states))

    def read_rows(self, layer_idx: int, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the rows read are dequantized, never a layer's whole history."""
        key_rows, value_rows = self._row_views[layer_idx]
        return self.key_codec.decode(key_rows.index_select(0, rows), dtype), self.value_codec.decode(
            value_rows.index_select(0, rows), dtype
        )


@functools.cache
def quantized_allocator(bits: int) -> type[RowAllocator]:
    """The allocator class for ``bits``-bit K/V: per-token rows for 8 bits, KIVI-style rows and a window for 4 and 2
    (``hf_vram.kvcache.windowed_allocator``)."""
    if bits in WINDOWED_BITS:
        return windowed_allocator(bits)
    return type(f"Int{bits}FullAttentionAllocator", (QuantizedFullAttentionAllocator,), {"bits": bits})
