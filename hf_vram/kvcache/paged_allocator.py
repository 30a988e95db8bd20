"""int8 K/V pages inside Transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``);
``quantized_allocator`` also hands out the int4/int2 ones (``hf_vram.kvcache.windowed_allocator``).

Transformers' ``FullAttentionCacheAllocator`` lays a group of layers out in one flat byte tensor: a block holds one
page per layer, a page ``page_size`` key rows then ``page_size`` value rows, and a token's row is found by a
physical index that the allocator hands to the model's attention (write indices for the new tokens, read indices
for everything the attention reads). This allocator keeps that geometry and indexing, and only changes what a row
holds: ``KVCodec`` bytes instead of model-dtype values. Writes quantize the new tokens only; reads dequantize only
the rows read, never a layer's whole history; block sharing, prefix hashing, forks (byte copies of whole blocks)
and CPU offloading work unchanged, since they move blocks as bytes.

Not supported: the block-table decode fast path (flash-attention kernels read model-dtype pages), so this allocator
reports ``supports_block_table = False`` and the batch uses the index path; sliding-window layers keep
Transformers' own allocator.
"""

from __future__ import annotations

import functools

import torch
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.continuous_batching.cache_allocators import CachePool, FullAttentionCacheAllocator
from transformers.generation.continuous_batching.utils import find_head_dim

from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import WINDOWED_BITS
from hf_vram.kvcache.windowed_allocator import windowed_allocator


class QuantizedFullAttentionAllocator(FullAttentionCacheAllocator):
    """``FullAttentionCacheAllocator`` whose rows are ``KVCodec`` bytes; ``bits`` is set by ``quantized_allocator``."""

    supports_block_table = False
    bits: int = 8

    def __init__(
        self,
        index: int,
        config: PreTrainedConfig,
        num_key_value_heads: int,
        cache_dtype: torch.dtype,
        page_size: int,
        layer_indices: list[int],
        allow_block_sharing: bool,
    ) -> None:
        self.head_dim = find_head_dim(config)
        self.num_key_value_heads = num_key_value_heads
        self.cache_dtype = cache_dtype  # what reads return: the model's dtype
        self.key_codec = KVCodec(self.bits, num_key_value_heads, self.head_dim)
        self.value_codec = KVCodec(self.bits, num_key_value_heads, self.head_dim)
        self.row_bytes = self.key_codec.row_bytes
        self._before_cache_tensor_init(
            index=index,
            layer_indices=layer_indices,
            tokens_per_page=page_size,
            bytes_per_page=self.rows_per_token * page_size * self.row_bytes,
            allow_block_sharing=allow_block_sharing,
        )

    @classmethod
    def bytes_per_token(cls, config: PreTrainedConfig, num_key_value_heads: int) -> int:
        """K and V bytes of one token in one layer (what a page of ``page_size`` tokens holds per token)."""
        return cls.rows_per_token * KVCodec(cls.bits, num_key_value_heads, find_head_dim(config)).row_bytes

    def register_cache_tensor(
        self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor: torch.Tensor, pool: CachePool
    ) -> None:
        """The same layout as the float allocator's (see its docstring), in rows of ``row_bytes`` bytes."""
        self.bytes_per_sector = bytes_per_sector
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)
        total_bytes = non_trash_bytes + 2 * bytes_per_sector
        total_tokens = (total_bytes // self.bytes_per_page) * self.tokens_per_page
        rows = cache_tensor[: total_tokens * self.rows_per_token * self.row_bytes].view(-1, self.row_bytes)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, rows, pool)
        self._row_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer_idx in enumerate(self.layer_indices):
            keys = rows[(2 * i + 0) * self.tokens_per_page :]
            values = rows[(2 * i + 1) * self.tokens_per_page :]
            self._row_views[layer_idx] = (keys, values)

    def update(
        self,
        key_states: torch.Tensor,  # [seqlen_q, num_kv_heads, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,  # [past_length + seqlen_q]
        write_index: torch.Tensor,  # [seqlen_q]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and write the new tokens, then read and dequantize the rows the attention needs. A batch with no
        cache reads (prefills only) attends to the new states as computed, like the float allocator."""
        key_rows, value_rows = self._row_views[layer_idx]
        key_rows.index_copy_(0, write_index, self.key_codec.encode(key_states))
        value_rows.index_copy_(0, write_index, self.value_codec.encode(value_states))
        if read_index.numel() == 0:
            return key_states, value_states
        keys = self.key_codec.decode(key_rows.index_select(0, read_index), key_states.dtype)
        values = self.value_codec.decode(value_rows.index_select(0, read_index), value_states.dtype)
        return keys, values

    def get_cache_for_block_table(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(
            "hf_vram: quantized KV pages have no block-table decode path (flash kernels read model-dtype pages); "
            "the batch must use the index path (supports_block_table is False)."
        )


@functools.cache
def quantized_allocator(bits: int) -> type[FullAttentionCacheAllocator]:
    """The allocator class for ``bits``-bit K/V: per-token rows for 8 bits, KIVI-style rows and a window for 4 and 2
    (``hf_vram.kvcache.windowed_allocator``)."""
    if bits in WINDOWED_BITS:
        return windowed_allocator(bits)
    return type(f"Int{bits}FullAttentionAllocator", (QuantizedFullAttentionAllocator,), {"bits": bits})
