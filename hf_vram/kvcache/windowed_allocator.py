"""4- and 2-bit K/V pages inside Transformers' continuous batching, KIVI-style (``hf_vram.kvcache.kivi``).

The page geometry and indexing are Transformers' ``FullAttentionCacheAllocator``'s (a token's row found by a
physical index; blocks shared, hashed, forked and offloaded as bytes); only what rows hold changes. A write puts the
new tokens in the window (``GroupWindow``: model dtype); a key group that fills is quantized once, keys per channel
over its tokens and values per token, into its rows, and its window slot is freed. A read returns windowed tokens as
they are and dequantizes the rest group by group: never a layer's whole history in full precision, never a second
quantization. Groups are ``GROUP`` tokens of one page, so only whole blocks (which prefix sharing and forks share)
are ever quantized, and a running request keeps at most ``GROUP - 1`` tokens in the window.

Not supported: the block-table decode path (``supports_block_table = False``: flash kernels read model-dtype pages),
and Transformers' CPU swap of requests (``cpu_offload_space``): it copies pages only, not the window, so
``HfVramPagedAttentionCache`` refuses it by name; the default soft reset (a request re-prefills) is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.continuous_batching.cache_allocators import CachePool, FullAttentionCacheAllocator
from transformers.generation.continuous_batching.utils import find_head_dim

from hf_vram.kvcache.group_window import GroupWindow
from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec


@dataclass
class _Step:
    """One forward's writes, shared by every layer of the allocator: which rows of the new states are quantized
    straight (``direct``, to ``direct_rows``), which go to the window (``windowed``, at ``slots``/``positions``), and
    the window groups they fill (``filled``, from the ``sealed`` slots)."""

    direct: torch.Tensor
    direct_rows: torch.Tensor
    windowed: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    filled: torch.Tensor
    sealed: torch.Tensor


class WindowedFullAttentionAllocator(FullAttentionCacheAllocator):
    """``FullAttentionCacheAllocator`` over ``WindowedKVCodec`` rows; ``bits`` is set by ``windowed_allocator``."""

    supports_block_table = False
    bits: int = 4
    group: int = GROUP

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
        if page_size % self.group:
            raise ValueError(
                f"hf_vram int{self.bits} KV: page_size {page_size} is not a multiple of the key group of {self.group} "
                f"tokens; set ContinuousBatchingConfig(page_size=...) to a multiple of {self.group} (e.g. 256)."
            )
        self.head_dim = find_head_dim(config)
        self.num_key_value_heads = num_key_value_heads
        self.cache_dtype = cache_dtype
        self.codec = WindowedKVCodec(self.bits, num_key_value_heads, self.head_dim, self.group)
        self.row_bytes = self.codec.row_bytes
        self._layer_pos = {layer: i for i, layer in enumerate(layer_indices)}
        self._before_cache_tensor_init(
            index=index,
            layer_indices=layer_indices,
            tokens_per_page=page_size,
            bytes_per_page=self.rows_per_token * page_size * self.row_bytes,
            allow_block_sharing=allow_block_sharing,
        )

    @classmethod
    def bytes_per_token(cls, config: PreTrainedConfig, num_key_value_heads: int) -> int:
        """K and V bytes of one token in one layer's pages (the window aside)."""
        return cls.rows_per_token * WindowedKVCodec(cls.bits, num_key_value_heads, find_head_dim(config), cls.group).row_bytes

    @classmethod
    def window_slot_bytes(cls, config: PreTrainedConfig, num_key_value_heads: int, dtype: torch.dtype) -> int:
        """Bytes of one window slot for one layer: a key group's K and V in ``dtype``."""
        return 2 * cls.group * num_key_value_heads * find_head_dim(config) * dtype.itemsize

    def register_cache_tensor(
        self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor: torch.Tensor, pool: CachePool
    ) -> None:
        """The float allocator's layout (see its docstring) in rows of ``row_bytes``, and an empty window."""
        self.bytes_per_sector = bytes_per_sector
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)
        total_bytes = non_trash_bytes + 2 * bytes_per_sector
        total_tokens = (total_bytes // self.bytes_per_page) * self.tokens_per_page
        rows = cache_tensor[: total_tokens * self.rows_per_token * self.row_bytes].view(-1, self.row_bytes)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, rows, pool)
        self._row_views = {
            layer: (rows[2 * i * self.tokens_per_page :], rows[(2 * i + 1) * self.tokens_per_page :])
            for i, layer in enumerate(self.layer_indices)
        }
        self._first_data_row = 2 * bytes_per_sector // self.bytes_per_block * self.block_physical_stride
        self._group_offsets = torch.arange(self.group, device=cache_tensor.device)
        self.window = GroupWindow(
            len(self.layer_indices),
            self.group,
            self.num_key_value_heads,
            self.head_dim,
            self.cache_dtype,
            num_groups=rows.shape[0] // self.group + 1,
            reserve=0,
            device=cache_tensor.device,
        )
        self._step: _Step | None = None

    # ___________________________________________ window bookkeeping ___________________________________________ #

    def _groups_of_blocks(self, block_ids: list[int]) -> list[int]:
        per_block = self.block_physical_stride // self.group
        return [b * per_block + g for b in block_ids for g in range(self.tokens_per_page // self.group)]

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        """Also forget the window of the request's unfinished group (only unfinished blocks have one, and those are
        never shared)."""
        self.window.drop(self._groups_of_blocks(self.block_table.get(request_id, [])))
        super().free_blocks(request_id, no_cache)

    def copy_blocks(self, source_block_ids: list[int], dest_block_ids: list[int]) -> None:
        """A fork copies pages as bytes, and the window of an unfinished group with them."""
        super().copy_blocks(source_block_ids, dest_block_ids)
        self.window.copy(self._groups_of_blocks(source_block_ids), self._groups_of_blocks(dest_block_ids))

    def _begin_step(self, write_index: torch.Tensor) -> None:
        """Sort this step's writes: groups written whole in this step (a prefill's) are quantized straight from the
        states; the others go to the window, and those they fill are sealed (quantized by every layer's update
        before it reads)."""
        group_ids = write_index // self.group
        groups, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        whole = (counts == self.group) & (groups * self.group >= self._first_data_row)  # the write trash: windowed
        direct = whole[inverse]
        at = direct.nonzero().squeeze(1)
        at = at[torch.argsort(write_index[at])]  # a group's rows in order: [n, group] after reshape
        windowed = (~direct).nonzero().squeeze(1)
        window_groups, positions = group_ids[windowed], write_index[windowed] % self.group
        self.window.take(torch.unique(window_groups).tolist())
        slots = self.window.lookup[window_groups]
        filled = torch.unique(window_groups[positions == self.group - 1])
        filled = filled[filled * self.group >= self._first_data_row]  # the write trash never fills
        self._step = _Step(at, write_index[at], windowed, slots, positions, filled, self.window.seal(filled.tolist()))

    # _______________________________________________ update ___________________________________________________ #

    def update(
        self,
        key_states: torch.Tensor,  # [seqlen_q, num_kv_heads, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,  # [past_length + seqlen_q]
        write_index: torch.Tensor,  # [seqlen_q]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens to the window and quantize the groups they fill; then read. A batch with no cache
        reads (prefills only) attends to the new states as computed, like the float allocator."""
        position = self._layer_pos[layer_idx]
        if position == 0:
            self._begin_step(write_index)
        step, window = self._step, self.window
        key_rows, value_rows = self._row_views[layer_idx]
        if step.direct.numel():
            keys = key_states[step.direct].reshape(-1, self.group, self.num_key_value_heads, self.head_dim)
            key_rows.index_copy_(0, step.direct_rows, self.codec.encode_keys(keys))
            value_rows.index_copy_(0, step.direct_rows, self.codec.encode_values(value_states[step.direct]))
        window.keys[step.slots, position, step.positions] = key_states[step.windowed].to(self.cache_dtype)
        window.values[step.slots, position, step.positions] = value_states[step.windowed].to(self.cache_dtype)
        if step.filled.numel():
            rows = (step.filled[:, None] * self.group + self._group_offsets).reshape(-1)
            key_rows.index_copy_(0, rows, self.codec.encode_keys(window.keys[step.sealed, position]))
            values = window.values[step.sealed, position].reshape(-1, self.num_key_value_heads, self.head_dim)
            value_rows.index_copy_(0, rows, self.codec.encode_values(values))
        if position == len(self.layer_indices) - 1:
            window.end_step()
        if read_index.numel() == 0:
            return key_states, value_states
        return self._read(key_rows, value_rows, position, read_index, key_states.dtype)

    def _read(self, key_rows, value_rows, position: int, read_index: torch.Tensor, dtype: torch.dtype):
        """Windowed rows from the window, quantized rows dequantized, trash rows (padding) as zeros."""
        shape = (read_index.shape[0], self.num_key_value_heads, self.head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=read_index.device)
        values = torch.zeros_like(keys)
        slot = self.window.lookup[read_index // self.group]
        windowed = slot >= 0
        quantized = ~windowed & (read_index >= self._first_data_row)
        if windowed.any():
            at = windowed.nonzero().squeeze(1)
            s, p = slot[at], read_index[at] % self.group
            keys[at] = self.window.keys[s, position, p].to(dtype)
            values[at] = self.window.values[s, position, p].to(dtype)
        if quantized.any():
            at = quantized.nonzero().squeeze(1)
            rows = read_index[at]
            keys[at] = self._dequantize_keys(key_rows, rows, dtype)
            values[at] = self.codec.decode_values(value_rows.index_select(0, rows), dtype)
        return keys, values

    def _dequantize_keys(self, key_rows: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys of quantized rows. Reads take whole groups in order (a request reads its pages from the start), so
        the codes are dequantized group-wise with each group's meta read once; any other order reads each row's
        meta."""
        groups, inverse, counts = torch.unique_consecutive(rows // self.group, return_inverse=True, return_counts=True)
        group_rows = key_rows.index_select(0, (groups[:, None] * self.group + self._group_offsets).reshape(-1))
        if (
            rows.numel() == group_rows.shape[0]
            and bool((counts == self.group).all())
            and bool((rows % self.group == self._group_offsets.repeat(groups.numel())).all())
        ):
            return self.codec.decode_keys(group_rows, dtype)
        meta = self.codec.group_meta(group_rows.view(-1, self.group, self.row_bytes))
        codes = key_rows.index_select(0, rows)[:, : self.codec.code_bytes]
        return self.codec.keys_from_codes(codes, meta[inverse], dtype)

    def get_cache_for_block_table(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(
            "hf_vram: int4/int2 KV pages have no block-table decode path (flash kernels read model-dtype pages); "
            "the batch must use the index path (supports_block_table is False)."
        )


@functools.cache
def windowed_allocator(bits: int) -> type[WindowedFullAttentionAllocator]:
    """The allocator class for ``bits``-bit (4 or 2) KIVI-style K/V."""
    return type(f"Int{bits}WindowedFullAttentionAllocator", (WindowedFullAttentionAllocator,), {"bits": bits})
