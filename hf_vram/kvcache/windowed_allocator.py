"""4- and 2-bit K/V pages inside Transformers' continuous batching, KIVI-style (``hf_vram.kvcache.kivi``).

The page geometry and indexing are ``RowAllocator``'s, i.e. Transformers' (a token's row found by a physical index;
blocks shared, hashed, forked and offloaded as bytes); only what rows hold changes. A write puts the
new tokens of an unfinished key group in the request's window (``GroupWindow``: int8 rows, in pool blocks the
scheduler counts, so it stays inside the KV budget); a group that fills is quantized once, keys per channel over its
tokens and values per token, into its rows; a group a prefill writes whole is quantized straight from the states
rounded as the window would hold them. A read returns windowed tokens from the window and dequantizes the rest group by group: never a layer's whole history in
full precision, never a second quantization. Keys are quantized turned back to before their rotary embedding (``rope_frame``),
by the position of each token in its request (from the block tables: a block holds the same positions for every
request that shares it). Groups are ``GROUP`` tokens of one page, so whole blocks (which prefix
sharing and forks share) are always quantized, and a running request keeps at most ``GROUP - 1`` tokens in its
window.

Not supported: the block-table decode path (as for every ``RowAllocator``), and Transformers' CPU swap of requests (``cpu_offload_space``): it copies a request's pages only, not its window, so
``HfVramPagedAttentionCache`` refuses it by name; the default soft reset (a request re-prefills) is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cache_allocators import CachePool

from hf_vram.kvcache.group_window import GroupWindow
from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec
from hf_vram.kvcache.rope_frame import RopeFrame
from hf_vram.kvcache.row_allocator import RowAllocator


@dataclass
class _Step:
    """One forward's writes, shared by every layer of the allocator: rows of the new states quantized straight
    (``direct``, to ``direct_rows``, their groups' first positions ``direct_starts``); rows that fill window groups
    (``filling``, at ``filling_slots`` / ``filling_positions``), the groups they fill (``filled``, first positions
    ``filled_starts``) and the slots those groups are read from (``sealed``); the other windowed rows (``rest``);
    and, once the first layer has read, the read's key groups (``read_groups``, ``read_picks``: each read row's
    place in them) and their rotary angles (``read_angles``)."""

    direct: torch.Tensor
    direct_rows: torch.Tensor
    filling: torch.Tensor
    filling_slots: torch.Tensor
    filling_positions: torch.Tensor
    filled: torch.Tensor
    sealed: torch.Tensor
    rest: torch.Tensor
    rest_slots: torch.Tensor
    rest_positions: torch.Tensor
    direct_starts: torch.Tensor
    filled_starts: torch.Tensor
    block_positions: torch.Tensor
    read_groups: torch.Tensor | None = None
    read_picks: torch.Tensor | None = None
    read_angles: tuple[torch.Tensor, torch.Tensor] | None = None


class WindowedFullAttentionAllocator(RowAllocator):
    """``RowAllocator`` over ``WindowedKVCodec`` rows, with each request's window; ``bits`` is set by
    ``windowed_allocator``."""

    bits: int = 4
    group: int = GROUP

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # Transformers passes page_size and the rest by name
        if self.tokens_per_page % self.group:
            raise ValueError(
                f"hf_vram int{self.bits} KV: page_size {self.tokens_per_page} is not a multiple of the key group of "
                f"{self.group} tokens; set ContinuousBatchingConfig(page_size=...) to a multiple of {self.group} "
                "(e.g. 256)."
            )
        frame = RopeFrame.for_config(self.model_config, self.head_dim)
        self.codec = WindowedKVCodec(self.bits, self.num_key_value_heads, self.head_dim, self.group, frame)
        self._layer_pos = {layer: i for i, layer in enumerate(self.layer_indices)}

    @classmethod
    def row_bytes_for(cls, num_key_value_heads: int, head_dim: int) -> int:
        return WindowedKVCodec(cls.bits, num_key_value_heads, head_dim, cls.group).row_bytes

    def register_cache_tensor(
        self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor: torch.Tensor, pool: CachePool
    ) -> None:
        """``RowAllocator``'s rows, and an empty window over the same tensor."""
        super().register_cache_tensor(bytes_per_sector, non_trash_bytes, cache_tensor, pool)
        self._first_data_row = 2 * bytes_per_sector // self.bytes_per_block * self.block_physical_stride
        self._group_offsets = torch.arange(self.group, device=cache_tensor.device)
        self.window = GroupWindow(
            cache_tensor,
            self.bytes_per_block,
            len(self.layer_indices),
            self.group,
            self.num_key_value_heads,
            self.head_dim,
            self.cache_dtype,
            num_groups=self._rows.shape[0] // self.group + 1,
            num_blocks=self.num_blocks + 2 * self.blocks_per_sector,
        )
        self._step: _Step | None = None

    # ___________________________________________ window bookkeeping ___________________________________________ #

    def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
        """Pages, and the request's window when it has none yet: the scheduler admits a request only when both fit."""
        pages = super().needs_new_blocks(request_id, past_length, query_length)
        return pages + (0 if request_id in self.window.slot_of else self.window.blocks_per_slot)

    def allocate_cache_to_request(self, request_id: str, past_length: int, query_length: int) -> None:
        super().allocate_cache_to_request(request_id, past_length, query_length)
        if request_id not in self.window.slot_of:
            self.window.open(request_id, self.pool.get_free_blocks(self.index, self.window.blocks_per_slot))

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        """The request's window goes back to the pool with its pages."""
        self.pool.free_blocks(self.index, self.window.close(request_id))
        super().free_blocks(request_id, no_cache)

    def count_non_shareable_blocks(self, source_request_id: str, past_length: int) -> int:
        """A fork needs its own window too."""
        return super().count_non_shareable_blocks(source_request_id, past_length) + self.window.blocks_per_slot

    def fork_blocks(self, source_request_id: str, dest_request_id: str, past_length: int) -> tuple[list[int], list[int]]:
        """Transformers' fork, plus a window for the fork holding a copy of the source's unfinished group (the
        caller copies the returned block pairs as bytes, the window's among them)."""
        to_copy, fresh = super().fork_blocks(source_request_id, dest_request_id, past_length)
        blocks = self.pool.get_free_blocks(self.index, self.window.blocks_per_slot)
        slot = self.window.open(dest_request_id, blocks)
        source_slot = self.window.slot_of.get(source_request_id)
        group_id = self.window.bound.get(source_slot)
        if group_id is not None:
            per_block = self.block_physical_stride // self.group
            source_table, dest_table = self.block_table[source_request_id], self.block_table[dest_request_id]
            at = source_table.index(group_id // per_block)
            self.window.bind(slot, dest_table[at] * per_block + group_id % per_block)
        return to_copy + self.window.blocks_of.get(source_slot, []), fresh + (blocks if source_slot is not None else [])

    def _owner_slot(self, group_id: int) -> int:
        """The window slot of the request whose block holds ``group_id`` (a group that starts being written)."""
        block = group_id * self.group // self.block_physical_stride
        for request_id, table in self.block_table.items():
            if block in table and request_id in self.window.slot_of:
                return self.window.slot_of[request_id]
        raise RuntimeError(
            f"hf_vram int{self.bits} KV: block {block} is written but no running request with a window holds it; "
            "this is a bug in the paged cache's bookkeeping, and the batch stops here rather than compute wrong."
        )

    def _begin_step(self, write_index: torch.Tensor) -> None:
        """Sort this step's writes: groups written whole in this step (a prefill's) are quantized straight from the
        states; the rows of other groups go to their request's window, and the groups they fill are quantized from
        it (every layer, before it reads; rows of a later group of the same request wait until then, since they
        reuse the window). Padding's writes (the write trash) are dropped."""
        data = write_index >= self._first_data_row
        group_ids = write_index // self.group
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        direct = (counts == self.group)[inverse] & data
        at = direct.nonzero().squeeze(1)
        at = at[torch.argsort(write_index[at])]  # a group's rows in order: [n, group] after reshape
        windowed = (~direct & data).nonzero().squeeze(1)
        window_groups, positions = group_ids[windowed], write_index[windowed] % self.group
        window = self.window
        slots = window.lookup[window_groups]
        started = slots < 0  # groups this step starts: one per request every `group` tokens, found by owner
        for gid in torch.unique(window_groups[started]).tolist():
            slots[window_groups == gid] = self._owner_slot(gid)
        last = positions == self.group - 1  # the row that fills its group: one per filled group
        filled, sealed = window_groups[last], slots[last]  # aligned: the group and the slot it is read from
        filling = torch.isin(window_groups, filled)
        for slot in sealed.tolist():  # filled groups are read quantized from now on
            window.unbind(slot)
        for gid in torch.unique(window_groups[started & ~filling]).tolist():
            window.bind(int(slots[window_groups == gid][0]), gid)
        block_positions = self._block_positions(write_index.device)
        self._step = _Step(
            at,
            write_index[at],
            windowed[filling],
            slots[filling],
            positions[filling],
            filled,
            sealed,
            windowed[~filling],
            slots[~filling],
            positions[~filling],
            self._group_starts(write_index[at][:: self.group] // self.group, block_positions),
            self._group_starts(filled, block_positions),
            block_positions,
        )

    def _block_positions(self, device: torch.device) -> torch.Tensor:
        """Each physical block's place in its requests' sequences (the same in every request sharing it)."""
        positions = torch.zeros(self._rows.shape[0] // self.block_physical_stride + 1, dtype=torch.long)
        for table in self.block_table.values():
            positions[table] = torch.arange(len(table))
        return positions.to(device)

    def _group_starts(self, group_ids: torch.Tensor, block_positions: torch.Tensor) -> torch.Tensor:
        """The position in its sequence of each group's first token."""
        rows = group_ids * self.group
        return block_positions[rows // self.block_physical_stride] * self.tokens_per_page + rows % self.block_physical_stride

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
        if step.direct.numel():  # rounded as the window would hold them, so every group is quantized alike
            keys = window.as_stored(key_states[step.direct])
            keys = keys.reshape(-1, self.group, self.num_key_value_heads, self.head_dim)
            key_rows.index_copy_(0, step.direct_rows, self.codec.encode_keys(keys, step.direct_starts))
            values = window.as_stored(value_states[step.direct])
            value_rows.index_copy_(0, step.direct_rows, self.codec.encode_values(values))
        if step.filled.numel():
            window.write(step.filling_slots, position, 0, step.filling_positions, key_states[step.filling])
            window.write(step.filling_slots, position, 1, step.filling_positions, value_states[step.filling])
            rows = (step.filled[:, None] * self.group + self._group_offsets).reshape(-1)
            keys = window.groups(step.sealed, position, 0)
            key_rows.index_copy_(0, rows, self.codec.encode_keys(keys, step.filled_starts))
            values = window.groups(step.sealed, position, 1).reshape(-1, self.num_key_value_heads, self.head_dim)
            value_rows.index_copy_(0, rows, self.codec.encode_values(values))
        if step.rest.numel():
            window.write(step.rest_slots, position, 0, step.rest_positions, key_states[step.rest])
            window.write(step.rest_slots, position, 1, step.rest_positions, value_states[step.rest])
        if read_index.numel() == 0:
            return key_states, value_states
        return self._read(key_rows, value_rows, position, read_index, key_states.dtype)

    def _read(self, key_rows, value_rows, position: int, read_index: torch.Tensor, dtype: torch.dtype):
        """Every row dequantized (keys group by group: whole groups, each group's meta read once), then the
        windowed rows replaced by the window's; padding reads the never-written trash rows, which decode to zeros."""
        keys = self._dequantize_keys(key_rows, read_index, dtype, first_layer=position == 0)
        values = self.codec.decode_values(value_rows.index_select(0, read_index), dtype)
        slot = self.window.lookup[read_index // self.group]
        at = (slot >= 0).nonzero().squeeze(1)
        if at.numel():
            s, p = slot[at], read_index[at] % self.group
            keys[at] = self.window.read(s, position, 0, p).to(dtype)
            values[at] = self.window.read(s, position, 1, p).to(dtype)
        return keys, values

    def _dequantize_keys(self, key_rows: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype, first_layer: bool):
        """Keys of ``rows``: the groups they fall in are dequantized whole (a request reads its pages in order, so
        those are its pages, and the part of its last group the window holds), then the rows picked from them. The
        groups, picks and rotary angles are found once a step, by its first layer."""
        step = self._step
        if first_layer or step.read_groups is None:
            groups, inverse = torch.unique_consecutive(rows // self.group, return_inverse=True)
            step.read_groups = (groups[:, None] * self.group + self._group_offsets).reshape(-1)
            step.read_picks = inverse * self.group + rows % self.group
            step.read_angles = self.codec.key_angles(self._group_starts(groups, step.block_positions), dtype)
        keys = self.codec.decode_keys(key_rows.index_select(0, step.read_groups), dtype, angles=step.read_angles)
        return keys.index_select(0, step.read_picks)


@functools.cache
def windowed_allocator(bits: int) -> type[WindowedFullAttentionAllocator]:
    """The allocator class for ``bits``-bit (4 or 2) KIVI-style K/V."""
    return type(f"Int{bits}WindowedFullAttentionAllocator", (WindowedFullAttentionAllocator,), {"bits": bits})
