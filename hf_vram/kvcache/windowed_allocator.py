"""4- and 2-bit K/V pages inside Transformers' continuous batching, KIVI-style (``hf_vram.kvcache.kivi``).

The page geometry and indexing are ``RowAllocator``'s, i.e. Transformers' (a token's row found by a physical index;
blocks shared, hashed, forked and offloaded as bytes); only what rows hold changes. A write puts the
new tokens of an unfinished key group in the request's window (``GroupWindow``: int8 rows, in pool blocks the
scheduler counts, so it stays inside the KV budget, and where a page is one group partly in that group's own page
block until it is sealed); a group that fills is quantized once, keys per channel over its
tokens and values per token, into its rows; a group a prefill writes whole is quantized straight from the states
rounded as the window would hold them. A read returns windowed tokens from the window and dequantizes the rest group by group: never a layer's whole history in
full precision, never a second quantization. Keys are quantized turned back to before their rotary embedding (``rope_frame``),
by the position of each token in its request (from the block tables: a block holds the same positions for every
request that shares it). Groups are ``GROUP`` tokens of one page, so whole blocks (which prefix
sharing and forks share) are always quantized in the pages. At int2 the window also keeps int8 copies of each
request's first group and its last 3 whole groups, which reads take from there (``kivi.window_policy``: 2-bit
perplexity +5.9% instead of +42.9%; ``kv_cache.sink_tokens`` / ``recent_tokens`` set them at either width: at int4
64 and 64 help long contexts); a request that reuses another's cached blocks reads them from the window of a
request that holds them, else from the pages. At int4 (at int2 with ``kv_cache.rotate_values``) values are written turned by
``value_rotation`` (window and pages alike) and read back turned; ``HfVramPagedAttentionCache.update`` has them turned
back.

Transformers' CPU swap (``cpu_offload_space``) copies a request's pages to host memory and back; its window goes with
them: the swap frees the request's blocks with ``no_cache`` (nothing else does), so the window's bytes are parked in
host memory there (``_Parked``: what each place held, by the held group's place in the request's block table) and
come back into the new window when the request is restored (allocated again past its first token), bound to the
groups of its new blocks. A request reset instead (re-prefilled from its tokens) or cancelled while swapped out
drops what was parked. Not supported: the block-table decode path (as for every ``RowAllocator``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cache_allocators import CachePool

from hf_vram.config import kv_cache_section
from hf_vram.kernels import kivi_write, kv_write
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.group_window import GroupWindow
from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec, row_scale, window_policy
from hf_vram.kvcache.layer_widths import page_slots, wide_index, wide_layers, wide_span
from hf_vram.kvcache.paged_decodes import DecodePlan, KiviReads
from hf_vram.kvcache.rope_frame import RopeFrame
from hf_vram.kvcache.row_allocator import RowAllocator
from hf_vram.kvcache.value_rotation import rotate, value_rotation


@dataclass
class _Step:
    """One forward's writes, shared by every layer of the allocator (indices into the written rows): rows of groups
    written whole in this step, quantized straight (``direct``, to ``direct_rows``, their groups' first positions
    ``direct_starts``); rows that fill a window group (``filling``, at window bytes ``filling_at``), the groups they
    fill (``filled``, first positions ``filled_starts``), quantized from the window rows at ``sealed_at``; rows
    written to the window after that (``later``, at ``later_at``: other unfinished groups, and the whole groups the
    window keeps); and, once the first layer has read, the read's key groups (``read_groups``, ``read_picks``: each
    read row's place in them), their rotary angles (``read_angles``), and the read rows the window answers for
    (``window_reads``: where in the read, and their window bytes). Window bytes are ``GroupWindow.offsets``, every
    layer's K and V: ``[layers, 2, n]``."""

    direct: torch.Tensor
    direct_rows: torch.Tensor
    direct_starts: torch.Tensor
    filling: torch.Tensor
    filling_at: torch.Tensor
    filled: torch.Tensor
    filled_starts: torch.Tensor
    sealed_at: torch.Tensor
    later: torch.Tensor
    later_at: torch.Tensor
    block_positions: torch.Tensor
    read_groups: torch.Tensor | None = None
    read_picks: torch.Tensor | None = None
    read_angles: tuple[torch.Tensor, torch.Tensor] | None = None
    window_reads: tuple[torch.Tensor, torch.Tensor] | None = None
    kivi: tuple | None = None  # the decodes' positions, window rows and rotary tables (``_kivi_reads``)
    wide_plan: DecodePlan | None = None  # the decodes' plan with its read index in int8 layers' rows
    seal_tables: tuple | None = None  # backward rotary tables of the direct and filled groups (``kivi_write``)


@dataclass
class _Parked:
    """A swapped-out request's window: the bytes of its slot's units (``GroupWindow.units``: its blocks, or its
    cells; host memory, in slot order) and each held place's group as (place, index of the group's block in the
    request's block table, group in that block). ``settled`` once the swap's own second free has passed
    (``free_blocks``)."""

    units: torch.Tensor
    held: list[tuple[int, int, int]]
    settled: bool = False


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
        self.policy = window_policy(self.bits, kv_cache_section(self.model_config))
        # values are stored turned (``value_rotation``): reads return them turned, and the cache has them turned back
        self.value_rotation = value_rotation(self.head_dim) if self.policy.rotate_values else None
        self._layer_pos = {layer: i for i, layer in enumerate(self.layer_indices)}
        self.wide_codec = KVCodec(8, self.num_key_value_heads, self.head_dim)
        # int4 layers in int2 pages (``int4_layers``): KIVI rows like the others', sealed from the same window
        self.wide_kivi = WindowedKVCodec(4, self.num_key_value_heads, self.head_dim, self.group, frame, row_scale(4, self.policy))

    def pages_of(self, layer_indices: list[int]) -> tuple[dict[int, int], int]:
        """One page per layer, and ``wide_span`` pages for each layer ``kv_cache.int8_layers`` keeps in int8 (or
        ``int4_layers`` in int4 at int2; ``hf_vram.kvcache.layer_widths``), which must be layers of this allocator
        (full attention)."""
        self.wide_bits, wide = wide_layers(self.model_config)
        elsewhere = [layer for layer in wide if layer not in layer_indices]
        if elsewhere:
            name = f"int{self.wide_bits}_layers"
            raise ValueError(
                f"hf_vram int{self.bits} KV: kv_cache.{name} names layer(s) {elsewhere}, which are not "
                "full-attention layers (their K/V live in Transformers' own pages); list only full-attention layers."
            )
        self.wide_layers = frozenset(wide)
        self.wide_span = wide_span(self.bits, self.num_key_value_heads, self.head_dim, self.wide_bits)
        return page_slots(layer_indices, wide, self.wide_span)

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
        if self.value_rotation is not None:  # on the pages' device: no copy per layer and step
            self.value_rotation = self.value_rotation.to(cache_tensor.device)
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
            places=self.policy.window_groups,
            groups_per_block=self.block_physical_stride // self.group,
            # a page is one group: its block is its own (not with int8 layers, which write their pages at once)
            borrow_group_block=self.tokens_per_page == self.group and not self.wide_layers,
        )
        self._step: _Step | None = None
        self._parked: dict[str, _Parked] = {}
        # int8 layers: rows of ``wide_span`` one-page rows, keys in the layer's first page(s), values after them
        width, page = self.wide_span * self.row_bytes, self.tokens_per_page
        wide_rows = self._rows.view(-1, width)
        self._wide_first = {layer: 2 * self.page_of[layer] * page // self.wide_span for layer in self.wide_layers}
        self._wide_views = {layer: (wide_rows[first:], wide_rows[first + page :]) for layer, first in self._wide_first.items()}

    # ___________________________________________ window bookkeeping ___________________________________________ #

    def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
        """Pages, and the window blocks the step needs that the request's window does not hold yet: the scheduler
        admits a request only when both fit. A borrowing window's cells that the step does not use (dead once their
        group is sealed) go back first (the scheduler asks this before every step it schedules)."""
        pages = super().needs_new_blocks(request_id, past_length, query_length)
        return pages + self._window_blocks_needed(self.window.slot_of.get(request_id), past_length, query_length)

    def _window_blocks_needed(self, slot: int | None, past_length: int, query_length: int) -> int:
        """Blocks the window needs for a step; a borrowing slot first lets go of the cells the step does not use,
        the blocks that empties going back to the pool."""
        window, last = self.window, self._last_window_offset(past_length, query_length)
        if slot is not None:
            self.pool.free_blocks(self.index, window.trim(slot, last))
        return window.blocks_needed(slot, last)

    def _last_window_offset(self, past_length: int, query_length: int) -> int:
        """The last place in its group of a token the window holds before a step of ``query_length`` tokens after
        ``past_length`` or writes in it (-1: none): a group filled in the step passes through the window, to
        ``group - 1``, unless the step writes it whole; the step's last, unfinished group waits there."""
        held = past_length % self.group
        if held:
            return min(held + query_length, self.group) - 1
        return query_length % self.group - 1

    def allocate_cache_to_request(self, request_id: str, past_length: int, query_length: int) -> None:
        """Pages, and a window the first time: empty, or what the request's window held when it was swapped out
        (a restore: allocated again past its first token with no block of its own yet; a request reset to re-prefill
        starts at 0, or past a shared prefix whose blocks it already holds). A borrowing window takes its own
        blocks only for a step that needs them (``needs_new_blocks`` counted them)."""
        restoring = past_length > 0 and not self.block_table.get(request_id)
        super().allocate_cache_to_request(request_id, past_length, query_length)
        window = self.window
        slot = window.slot_of.get(request_id)
        opened = slot is None
        blocks = self.pool.get_free_blocks(self.index, self._window_blocks_needed(slot, past_length, query_length))
        if opened:
            slot = window.open(request_id)
        window.grow(slot, self._last_window_offset(past_length, query_length), blocks)
        parked = self._parked.pop(request_id, None) if opened else None
        if parked is None or not restoring:
            return
        # the parked units past what the slot holds now are dead (past their group's seal): not needed back
        window.copy_units(slot, parked.units.to(window.bytes.device))
        table, per_block = self.block_table[request_id], self.block_physical_stride // self.group
        for place, table_position, group_in_block in parked.held:
            self.window.bind(slot, place, table[table_position] * per_block + group_in_block)

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        """The request's window goes back to the pool with its pages. Transformers' CPU swap frees with ``no_cache``
        (then, finishing the request, frees it once more): the window is parked first (see the module docstring).
        A later free of a parked request that holds nothing is a cancellation while swapped out: dropped."""
        slot = self.window.slot_of.get(request_id)
        if no_cache and slot is not None and request_id in self.block_table:
            self._park(request_id, slot)
        elif slot is None and request_id in self._parked:
            parked = self._parked[request_id]
            if parked.settled:
                del self._parked[request_id]
            parked.settled = True
        self.pool.free_blocks(self.index, self.window.close(request_id))
        super().free_blocks(request_id, no_cache)

    def _park(self, request_id: str, slot: int) -> None:
        """Copy the window of ``request_id`` (in ``slot``) to host memory, its groups by their block-table places."""
        table, per_block = self.block_table[request_id], self.block_physical_stride // self.group
        # a window binds only groups of its request's own blocks (written by it, or given to a fork), so every held
        # group's block is in the table; ``index`` raises rather than park a window that would come back short
        held = [
            (place, table.index(group_id // per_block), group_id % per_block)
            for place, group_id in self.window.held(slot).items()
        ]
        self._parked[request_id] = _Parked(self.window.unit_data(slot).to("cpu"), held)

    def count_non_shareable_blocks(self, source_request_id: str, past_length: int) -> int:
        """A fork needs its own window too (a borrowing window: the blocks for as many cells as the source's holds)."""
        return super().count_non_shareable_blocks(source_request_id, past_length) + self._fork_window_blocks(source_request_id)

    def _fork_window_blocks(self, source_request_id: str) -> int:
        """Blocks the window of a fork of ``source_request_id`` takes: a slot's own, or cells as many as the
        source's window holds."""
        window = self.window
        if not window.borrows:
            return window.blocks_per_slot
        return window.cells.blocks_needed(window.cells.held(window.slot_of.get(source_request_id, -1)))

    def fork_blocks(self, source_request_id: str, dest_request_id: str, past_length: int) -> tuple[list[int], list[int]]:
        """Transformers' fork, plus a window for the fork holding a copy of the source's (the caller copies the
        returned block pairs as bytes, the window's among them). The fork reads its copy of what lives in blocks it
        was given a copy of (the unfinished group's); groups in blocks it shares with the source stay read from the
        source's window while that holds them, then from the pages, which hold them quantized already."""
        to_copy, fresh = super().fork_blocks(source_request_id, dest_request_id, past_length)
        window = self.window
        blocks = self.pool.get_free_blocks(self.index, self._fork_window_blocks(source_request_id))
        slot = window.open(dest_request_id)
        source_slot = window.slot_of.get(source_request_id)
        if window.borrows:  # cells, copied here as bytes (they share blocks with other requests' cells)
            if source_slot is not None:
                window.cells.grow(slot, window.cells.held(source_slot), blocks)
                window.copy_units(slot, window.unit_data(source_slot))
            blocks = []
        else:
            window.grow(slot, -1, blocks)
        per_block = self.block_physical_stride // self.group
        source_table, dest_table = self.block_table[source_request_id], self.block_table[dest_request_id]
        for place, group_id in self.window.held(source_slot).items() if source_slot is not None else ():
            block = dest_table[source_table.index(group_id // per_block)]
            if block != group_id // per_block:
                self.window.bind(slot, place, block * per_block + group_id % per_block)
        return to_copy + self.window.blocks_of.get(source_slot, []), fresh + (blocks if source_slot is not None else [])

    def _begin_step(self, write_index: torch.Tensor) -> None:
        """Sort this step's writes (padding's, to the write trash, are dropped). Groups written whole in this step
        (a prefill's) are quantized straight from the states; the rows of other groups go to their request's window,
        and the groups they fill are quantized from it (every layer, before it reads). Then the window keeps, per
        request, what ``window_policy`` says: the sink, the last ``lag_groups`` whole groups (a prefill's are copied
        in), the unfinished group; the group that falls out of the lag is let go, so reads take it from the pages."""
        group, policy = self.group, self.policy
        device = write_index.device
        block_positions, block_slots = self._block_layout(device)
        data = (write_index >= self._first_data_row).nonzero().squeeze(1)
        rows = write_index[data]
        group_ids = rows // group
        starts = self._group_starts(group_ids, block_positions)
        slots = block_slots[rows // self.block_physical_stride]
        if (slots < 0).any():
            raise RuntimeError(
                f"hf_vram int{self.bits} KV: a block is written but no running request with a window holds it; this is "
                "a bug in the paged cache's bookkeeping, and the batch stops here rather than compute wrong."
            )
        index = starts // group  # each row's group's place in its request's sequence
        places = policy.place(index)
        whole_after = torch.zeros(int(slots.max()) + 1 if slots.numel() else 1, dtype=torch.long, device=device)
        whole_after.scatter_reduce_(0, slots, (starts + rows % group + 1) // group, "amax")  # per slot
        kept = (index < policy.sink_groups) | (index >= whole_after[slots] - policy.lag_groups)
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        whole = counts[inverse] == group
        direct = whole.nonzero().squeeze(1)
        direct = direct[torch.argsort(rows[direct])]  # a group's rows in order: [n, group] after reshape
        windowed = ~whole
        last = windowed & (rows % group == group - 1)  # the row that fills its group: one per filled group
        filling = windowed & torch.isin(group_ids, group_ids[last])
        later = (windowed & ~filling) | (whole & kept)
        window = self.window
        for gid, slot, place in torch.unique(torch.stack([group_ids, slots, places])[:, kept], dim=1).t().tolist():
            window.bind(slot, place, gid)
        unfinished = torch.zeros_like(whole_after, dtype=torch.bool)
        unfinished[slots[index == whole_after[slots]]] = True
        touched = torch.zeros_like(unfinished)
        touched[slots] = True
        for slot in (touched & ~unfinished).nonzero().squeeze(1).tolist():  # the lag's oldest group goes
            window.unbind(slot, policy.place(int(whole_after[slot])))
        self._step = _Step(
            data[direct],
            rows[direct],
            starts[direct][::group],
            data[filling],
            window.offsets(slots[filling], places[filling], rows[filling] % group, group_ids[filling]),
            group_ids[last],
            starts[last],
            window.group_offsets(slots[last], places[last], group_ids[last]),
            data[later],
            window.offsets(slots[later], places[later], rows[later] % group, group_ids[later]),
            block_positions,
        )

    def _block_layout(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each physical block's place in its requests' sequences (the same in every request sharing it), and the
        window slot of a request holding it (-1: none; the blocks written are never shared, so their owner's)."""
        positions = torch.zeros(self._rows.shape[0] // self.block_physical_stride + 1, dtype=torch.long)
        slots = torch.full_like(positions, -1)
        for request_id, table in self.block_table.items():
            positions[table] = torch.arange(len(table))
            if request_id in self.window.slot_of:
                slots[table] = self.window.slot_of[request_id]
        return positions.to(device), slots.to(device)

    def _group_starts(self, group_ids: torch.Tensor, block_positions: torch.Tensor) -> torch.Tensor:
        """The position in its sequence of each group's first token."""
        return self._positions(group_ids * self.group, block_positions)

    def _positions(self, rows: torch.Tensor, block_positions: torch.Tensor) -> torch.Tensor:
        """The position in its sequence of each row's token."""
        return block_positions[rows // self.block_physical_stride] * self.tokens_per_page + rows % self.block_physical_stride

    def _window_hits(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(at, window bytes [layers, 2, n])`` of the rows the window answers for (``at``: where in ``rows``)."""
        group_ids = rows // self.group
        slot = self.window.lookup[group_ids]
        at = (slot >= 0).nonzero().squeeze(1)
        places = self.window.place_of[group_ids[at]]
        return at, self.window.offsets(slot[at], places, rows[at] % self.group, group_ids[at])

    # _______________________________________________ update ___________________________________________________ #

    def values_to_store(self, value_states: torch.Tensor) -> torch.Tensor:
        """The values turned by ``value_rotation``: written so, and returned so by every update."""
        return value_states if self.value_rotation is None else rotate(value_states, self.value_rotation)

    def write_rows(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, write_index: torch.Tensor) -> None:
        """Write the new tokens to the window and quantize the groups they fill (the step sorted by its first
        layer); every layer does so before it reads. Groups are sealed by hf_vram's CPU kernel (``kivi_write``:
        one op from their int8 rows) where it takes the states, else by the codec's torch ops; the same rows up to
        a code at an exact rounding tie."""
        position = self._layer_pos[layer_idx]
        if position == 0:
            self._begin_step(write_index)
        if layer_idx in self.wide_layers and self.wide_bits == 8:
            self._write_int8(key_states, value_states, layer_idx, write_index)
            return
        step, window = self._step, self.window
        codec, key_rows, value_rows, to_rows = self._kivi_rows(layer_idx)
        by_kernel = kivi_write.takes(key_states, window.dtype)
        if by_kernel and step.seal_tables is None:  # the groups and positions are the same in every layer of the step
            step.seal_tables = tuple(self.codec.seal_tables(s) for s in (step.direct_starts, step.filled_starts))
        if step.direct.numel():  # rounded as the window would hold them, so every group is quantized alike
            keys, values = self._seal_direct(codec, step, key_states[step.direct], value_states[step.direct], by_kernel)
            rows = to_rows(step.direct_rows)
            key_rows.index_copy_(0, rows, keys)
            value_rows.index_copy_(0, rows, values)
        if step.filled.numel():
            window.write(step.filling_at[position, 0], key_states[step.filling])
            window.write(step.filling_at[position, 1], value_states[step.filling])
            keys, values = self._seal_filled(codec, step, step.sealed_at[position], by_kernel)
            rows = to_rows((step.filled[:, None] * self.group + self._group_offsets).reshape(-1))
            key_rows.index_copy_(0, rows, keys)
            value_rows.index_copy_(0, rows, values)
        if step.later.numel():
            window.write(step.later_at[position, 0], key_states[step.later])
            window.write(step.later_at[position, 1], value_states[step.later])

    def _kivi_rows(self, layer_idx: int):
        """``(codec, key rows, value rows, physical index -> row)`` of a KIVI layer: its own page rows, or an int4
        layer's in int2 pages (``int4_layers``): its wide rows, cut to the int4 row."""
        if layer_idx not in self.wide_layers:
            return (self.codec, *self._row_views[layer_idx], lambda rows: rows)
        row_bytes = self.wide_kivi.row_bytes
        key_rows, value_rows = (view[:, :row_bytes] for view in self._wide_views[layer_idx])
        return self.wide_kivi, key_rows, value_rows, lambda rows: wide_index(rows, self.block_physical_stride, self.wide_span)

    def _write_int8(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, write_index: torch.Tensor
    ) -> None:
        """An int8 layer's new tokens, each quantized on its own into its wide row (no window, no group to wait for):
        by hf_vram's row writer where it takes the states, else by the codec."""
        rows = wide_index(write_index, self.block_physical_stride, self.wide_span)
        if kv_write.takes(key_states):
            width, first = self.wide_span * self.row_bytes, self._wide_first[layer_idx]
            for kv, states in enumerate((key_states, value_states)):
                at = (rows + first + kv * self.tokens_per_page) * width
                kv_write.quantize_rows_int8(states, self._rows.view(-1), at)
            return
        row_bytes = self.wide_codec.row_bytes
        for views, states in zip(self._wide_views[layer_idx], (key_states, value_states), strict=True):
            views[:, :row_bytes].index_copy_(0, rows, self.wide_codec.encode(states))

    def _read_int8(self, layer_idx: int, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """An int8 layer's keys and values of physical rows ``rows``."""
        at, row_bytes = wide_index(rows, self.block_physical_stride, self.wide_span), self.wide_codec.row_bytes
        key_rows, value_rows = (v.index_select(0, at)[:, :row_bytes] for v in self._wide_views[layer_idx])
        return self.wide_codec.decode(key_rows, dtype), self.wide_codec.decode(value_rows, dtype)

    def _seal_direct(self, codec: WindowedKVCodec, step: _Step, keys: torch.Tensor, values: torch.Tensor, by_kernel: bool):
        """Key and value rows (``codec``'s) of the groups a prefill writes whole, from their states rounded as the
        window holds them (the kernel: written as int8 rows into a scratch buffer, then sealed from there)."""
        if not by_kernel:
            grouped = self.window.as_stored(keys).reshape(-1, self.group, self.num_key_value_heads, self.head_dim)
            return codec.encode(grouped, self.window.as_stored(values), step.direct_starts)
        n, row = keys.shape[0], self.window.codec.row_bytes
        scratch, at = torch.empty(2 * n * row, dtype=torch.uint8), torch.arange(2 * n) * row
        kv_write.quantize_rows_int8(keys, scratch, at[:n])
        kv_write.quantize_rows_int8(values, scratch, at[n:])
        return kivi_write.encode_from_int8(codec, scratch, at[:n], at[n:], step.seal_tables[0], keys.dtype)

    def _seal_filled(self, codec: WindowedKVCodec, step: _Step, sealed_at: torch.Tensor, by_kernel: bool):
        """Key and value rows (``codec``'s) of the groups this step fills, from their window rows (``sealed_at``:
        [2, n])."""
        if by_kernel:
            return kivi_write.encode_from_int8(
                codec, self.window.bytes, sealed_at[0], sealed_at[1], step.seal_tables[1], self.window.dtype
            )
        keys = self.window.read(sealed_at[0]).reshape(-1, self.group, self.num_key_value_heads, self.head_dim)
        return codec.encode(keys, self.window.read(sealed_at[1]), step.filled_starts)

    def read_rows(self, layer_idx: int, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.wide_layers and self.wide_bits == 8:
            return self._read_int8(layer_idx, rows, dtype)
        return self._read(*self._kivi_rows(layer_idx), self._layer_pos[layer_idx], rows, dtype)

    def decode_rows(self, layer_idx: int, plan: DecodePlan) -> tuple[DecodePlan, torch.Tensor, torch.Tensor, KiviReads | None]:
        """A widened layer's decodes read its wide rows (the plan's read index mapped to them, once a step): an
        int8 layer's as int8 pages, an int4 layer's (``int4_layers``) as int4 KIVI rows with the window; the other
        layers' as ``RowAllocator`` hands them."""
        if layer_idx not in self.wide_layers:
            return super().decode_rows(layer_idx, plan)
        step = self._step
        if step.wide_plan is None:  # a step's plan is the same for every layer
            step.wide_plan = plan._replace(read_index=wide_index(plan.read_index, self.block_physical_stride, self.wide_span))
        if self.wide_bits == 8:
            return (step.wide_plan, *self._wide_views[layer_idx], None)
        codec, key_rows, value_rows, _ = self._kivi_rows(layer_idx)
        return (step.wide_plan, key_rows, value_rows, self._kivi_reads(self._layer_pos[layer_idx], plan, codec))

    def decode_extras(self, layer_idx: int, plan: DecodePlan) -> KiviReads:
        return self._kivi_reads(self._layer_pos[layer_idx], plan, self.codec)

    def _kivi_reads(self, position: int, plan: DecodePlan, codec: WindowedKVCodec) -> KiviReads:
        """The window offsets of this layer's K and V rows for the read rows the window holds (-1 elsewhere), with
        the step's positions and rotary tables (found once a step, by the first layer)."""
        step, window = self._step, self.window
        if position == 0 or step.kivi is None:
            positions = self._positions(plan.read_index, step.block_positions)
            frame = self.codec.frame
            if frame is not None:
                angles_at = torch.arange(int(positions.max()) + 1, device=positions.device)  # the pages' device
                cos, sin = frame.angles(angles_at, torch.float32)
                tables = (cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), frame.pairs)
            else:
                tables = (torch.empty(0, device=positions.device), torch.empty(0, device=positions.device), 0)
            at, hits = self._window_hits(plan.read_index)
            window_at = torch.full((*hits.shape[:2], positions.numel()), -1, dtype=torch.long, device=positions.device)
            window_at[:, :, at] = hits  # every layer's K and V offsets, -1 where the pages answer
            step.kivi = (positions, window_at, tables)
        positions, window_at, tables = step.kivi
        layout = (codec.bits, self.group, codec.code_bytes, codec.key_meta_bytes, codec.value_group)
        return KiviReads(positions, window.bytes, window_at[position, 0], window_at[position, 1], *tables, layout)

    def _read(self, codec, key_rows, value_rows, to_rows, position: int, read_index: torch.Tensor, dtype: torch.dtype):
        """Every row dequantized by ``codec`` (keys group by group: whole groups, each group's meta read once) from
        ``key_rows`` / ``value_rows`` (``to_rows`` maps a physical index to theirs), then the windowed rows replaced
        by the window's; padding reads the never-written trash rows, which decode to zeros."""
        keys = self._dequantize_keys(codec, key_rows, value_rows, to_rows, read_index, dtype, first_layer=position == 0)
        values = codec.decode_values(value_rows.index_select(0, to_rows(read_index)), dtype)
        step = self._step
        if position == 0 or step.window_reads is None:  # the same rows for every layer of the step
            step.window_reads = self._window_hits(read_index)
        at, hits = step.window_reads
        if at.numel():
            keys[at] = self.window.read(hits[position, 0]).to(dtype)
            values[at] = self.window.read(hits[position, 1]).to(dtype)
        return keys, values

    def _dequantize_keys(
        self,
        codec,
        key_rows: torch.Tensor,
        value_rows: torch.Tensor,
        to_rows,
        rows: torch.Tensor,
        dtype: torch.dtype,
        first_layer: bool,
    ):
        """Keys of ``rows``: the groups they fall in are dequantized whole (a request reads its pages in order, so
        those are its pages, and the part of its last group the window holds), then the rows picked from them. The
        groups, picks and rotary angles are found once a step, by its first layer."""
        step = self._step
        if first_layer or step.read_groups is None:
            groups, inverse = torch.unique_consecutive(rows // self.group, return_inverse=True)
            step.read_groups = (groups[:, None] * self.group + self._group_offsets).reshape(-1)
            step.read_picks = inverse * self.group + rows % self.group
            step.read_angles = self.codec.key_angles(self._group_starts(groups, step.block_positions), torch.float32)
        at = to_rows(step.read_groups)  # a group's value rows hold the rest of its key meta
        value_at = value_rows.index_select(0, at) if codec.key_meta_in_values else None  # int2: no key meta there
        keys = codec.decode_keys(key_rows.index_select(0, at), value_at, dtype, angles=step.read_angles)
        return keys.index_select(0, step.read_picks)


@functools.cache
def windowed_allocator(bits: int) -> type[WindowedFullAttentionAllocator]:
    """The allocator class for ``bits``-bit (4 or 2) KIVI-style K/V."""
    return type(f"Int{bits}WindowedFullAttentionAllocator", (WindowedFullAttentionAllocator,), {"bits": bits})
