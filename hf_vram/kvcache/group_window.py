"""The window of the int4/int2 pages: each running request's int8 rows (a scale per token and head, ``KVCodec``) of
the key groups its pages do not answer for yet, inside pool blocks.

The window is int8, not the model's dtype: it halves what a running request holds beyond its pages (for SmolLM2 at
int4, 2 pages of 64 tokens instead of 4; where it borrows its group's page block, below, at most 31 token cells:
0.31 of a block a running request in 108-byte rows, sampled through the int4 run of ``benchmarks/batching.py``), and int8 K/V is within 0.1% perplexity of bfloat16. Every key group is
quantized from these int8 rows (a group a prefill writes whole, from the states rounded the same way), so what a read
returns does not depend on which path wrote it.

Why not fewer bits, which would let a page block host more of its group (read-back prototypes, 2026-12-05: SmolLM2
in bfloat16, 4 pydoc windows of 2048 tokens, int4 pages, +0.72% perplexity with this window): rows of 7 bits for
keys and values +1.09%, 6 bits +2.68%, keys 8 and values 6 +1.11%, keys 6 and values 8 +2.36%; values kept out of
the window (quantized per token into the pages at once, the window holding keys alone) +1.28%, +1.45% with each
value row's range clipped by least error. Every one is past int4's +1.0% target; the best of them would have taken a
plain int4 window's largest from 0.88 of a block to about 0.45 (for 640-token sequences about 3.4x bfloat16's
capacity instead of 3.26x; in 108-byte int4 rows: the rows of 103 bytes, which hold part of the key meta in the value
rows, reach 3.41x with the int8 window, ``kivi.WindowedKVCodec``). Keys need the precision most: on a channel whose range over the group is under a
quarter of a token's widest channel, the group's per-channel int4 step is finer than a per-token 6-bit step.

A key group (``group`` tokens of one page) is quantized per channel, which needs all of its tokens; until then its
tokens wait here. A request's window has ``places`` groups (``kivi.window_policy``): the unfinished group and, at
int2 by default, the request's first group (the attention sink) and its last whole groups (``lag``), which read
from here while their pages already hold them quantized. Each request holds one slot; a slot's bytes are rows of one
token's K or V for one layer, addressed by byte offsets in the cache tensor, found for every layer's K and V at once
(``offsets``: a step's rows are the same in every layer), which hf_vram's kernels write and read directly (torch's
path goes through a strided ``[blocks, rows_per_block, row_bytes]`` view, one gather or scatter of whole rows).
``lookup`` and ``place_of`` map a group (its id in the pages) to the slot and place that hold it, or -1. The
scheduler counts a slot's blocks (and the blocks its new cells need) like pages
(``WindowedFullAttentionAllocator.needs_new_blocks``), so the window
never grows past the KV budget: a request whose window does not fit waits like one whose pages do not.

Two layouts:

- Where the window keeps other groups too (the sink, the lag), or a page holds several groups, a slot is
  ``blocks_per_slot`` blocks of its own, taken from the pool when the request first allocates and given back when it
  is freed; ``row = ((layer * 2 + kv) * places + place) * group + offset``.
- Where a page is one key group and the window holds only the unfinished group (int4 by default), the slot borrows
  that group's own page block: the block is the request's alone (a block is shared only once complete) and its
  page rows are written only when the group is sealed, layer by layer. The first ``hosted_tokens`` tokens of the
  group (every layer's K and V) live there, each layer's rows at or past the layer's page rows (``hosted_row``), so
  sealing a layer overwrites only rows of layers sealed already, or its own after reading them. Tokens from
  ``hosted_tokens`` on live in token cells (``window_cells``: one token's rows of every layer, in pool blocks that
  every request's window shares), taken a token at a time and given back once the group is sealed (``trim``): for
  SmolLM2 at int4 the first 33 of a group's 64 tokens need nothing beside the pages, and the other 31 a cell each
  (33 cells to a block) instead of a block of the request's own from the 34th token on. Swaps and forks carry the
  hosted rows inside the page block and the cells as bytes.

Either way a slot's storage is ``units`` of ``unit_bytes`` (its blocks, or its cells), which swaps park and forks
copy as bytes.
"""

from __future__ import annotations

import math

import torch

from hf_vram.kernels import kv_write
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.window_cells import WindowCells


def window_row_bytes(heads: int, head_dim: int) -> int:
    """Bytes of one token's K (or V) for one layer in the window."""
    return KVCodec(8, heads, head_dim).row_bytes


def slot_size(layers: int, places: int, group: int, row_bytes: int, bytes_per_block: int, borrow: bool) -> tuple[int, int]:
    """``(hosted_tokens, blocks)`` of one request's window: the tokens of its unfinished group that live in that
    group's own page block (``borrow``: a page is one group; only with a window of that group alone), and the pool
    blocks of its own for the rest, at most (at least one). Each layer's hosted rows must lie at or past its page
    rows, on whole rows of the block (``hosted_row``), which bounds them (see the module docstring)."""
    rows_per_block, page = bytes_per_block // row_bytes, bytes_per_block // layers
    hosted = 0
    if borrow and places == 1:
        hosted = min((rows_per_block * row_bytes - layer * page) // ((layers - layer) * 2 * row_bytes) for layer in range(layers))
        hosted = max(0, min(hosted, group))
    rows = layers * 2 * (places * group - hosted)
    return hosted, max(1, math.ceil(rows / rows_per_block))


def hosted_row(layer: int | torch.Tensor, layers: int, hosted: int, rows_per_block: int) -> int | torch.Tensor:
    """The row of a page block (in rows of the window's width) where layer ``layer``'s hosted rows (K then V)
    start: the layers' hosted rows fill the block's last whole rows in layer order, so layer ``l``'s start at or past
    its page rows (``l / layers`` of the block), which its sealing overwrites only after reading them, and later
    layers' page rows lie past them."""
    return rows_per_block - (layers - layer) * 2 * hosted


class GroupWindow:
    """Slots holding unfinished key groups (in pool blocks of their own, or in their groups' page blocks and token
    cells); ``lookup`` maps a group id to the slot that holds it. The allocator asks ``blocks_needed`` before a step,
    gives it those blocks with ``grow`` and takes back what ``trim`` and ``close`` let go."""

    def __init__(
        self,
        cache_tensor: torch.Tensor,
        bytes_per_block: int,
        layers: int,
        group: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_groups: int,
        num_blocks: int,
        places: int = 1,
        groups_per_block: int = 1,
        borrow_group_block: bool = False,
    ) -> None:
        self.bytes = cache_tensor.view(-1)
        self.bytes_per_block, self.group, self.dtype = bytes_per_block, group, dtype
        self.codec = KVCodec(8, heads, head_dim)
        self.row_bytes = self.codec.row_bytes
        self.rows_per_block = bytes_per_block // self.row_bytes
        if self.rows_per_block == 0:
            raise ValueError(
                f"hf_vram KV window: a block of {bytes_per_block} bytes cannot hold one token's K or V "
                f"({self.row_bytes} bytes); use a larger ContinuousBatchingConfig.page_size."
            )
        self.places = places
        # hosted_tokens: the first tokens of the unfinished group live in its page block (see the module docstring)
        self.hosted_tokens, self.blocks_per_slot = slot_size(
            layers, places, group, self.row_bytes, bytes_per_block, borrow_group_block
        )
        self.groups_per_block = groups_per_block  # group ids per block (Transformers' physical index / group)
        device = cache_tensor.device
        # a borrowing slot may hold no block of its own, so up to one slot per block (each request holds a page)
        max_slots = (num_blocks if self.borrows else num_blocks // self.blocks_per_slot) + 1
        self.slot_blocks = torch.full((max_slots, self.blocks_per_slot), -1, dtype=torch.long, device=device)
        # a borrowing slot's tokens past the hosted ones: a cell each (every layer's K and V rows, token-major)
        self.cells = WindowCells(bytes_per_block, layers * 2 * self.row_bytes, max_slots, group - self.hosted_tokens, device)
        self.lookup = torch.full((num_groups,), -1, dtype=torch.long, device=device)  # group id -> slot
        self.place_of = torch.full((num_groups,), -1, dtype=torch.long, device=device)  # group id -> place in it
        self.slot_of: dict[str, int] = {}  # request -> slot
        self.blocks_of: dict[int, list[int]] = {}  # slot -> its blocks (a borrowing slot's: none, or its extra)
        self.bound: dict[tuple[int, int], int] = {}  # (slot, place) -> the group it holds
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.layers = layers
        blocks_in_tensor = self.bytes.numel() // bytes_per_block
        self.rows = self.bytes.as_strided(
            (blocks_in_tensor, self.rows_per_block, self.row_bytes), (bytes_per_block, self.row_bytes, 1)
        )

    @property
    def borrows(self) -> bool:
        """Whether slots host their group's first tokens in its page block and take their own block only past them."""
        return self.hosted_tokens > 0

    def cells_for(self, last_offset: int) -> int:
        """Cells a borrowing slot whose group holds tokens up to ``last_offset`` (-1: none) takes."""
        return max(0, last_offset + 1 - self.hosted_tokens)

    def blocks_needed(self, slot: int | None, last_offset: int) -> int:
        """Pool blocks a step whose window tokens reach ``last_offset`` needs beyond what ``slot`` (None: not
        opened yet) holds: a slot's own blocks once, or the cells it does not hold yet beyond the free ones."""
        if not self.borrows:
            return self.blocks_per_slot if slot is None or not self.blocks_of[slot] else 0
        held = 0 if slot is None else self.cells.held(slot)
        return self.cells.blocks_needed(self.cells_for(last_offset) - held)

    def open(self, request_id: str) -> int:
        """Give ``request_id`` a slot, with nothing in it yet (``grow``)."""
        slot = self.free_slots.pop()
        self.slot_of[request_id] = slot
        self.blocks_of[slot] = []
        return slot

    def grow(self, slot: int, last_offset: int, blocks: list[int]) -> None:
        """``slot`` takes ``blocks`` (``blocks_needed`` of them, from the pool): as its own blocks, or as cells'
        blocks, its cells then reaching its group's tokens up to ``last_offset``."""
        if self.borrows:
            self.cells.grow(slot, self.cells_for(last_offset), blocks)
        elif blocks:
            if len(blocks) != self.blocks_per_slot:
                raise ValueError(f"hf_vram KV window: a slot takes {self.blocks_per_slot} blocks, not {len(blocks)}.")
            self.blocks_of[slot] = list(blocks)
            self.slot_blocks[slot] = torch.tensor(blocks, dtype=torch.long)

    def trim(self, slot: int, last_offset: int) -> list[int]:
        """A borrowing slot lets go of its cells past those a step reaching ``last_offset`` uses (dead: their
        group was sealed, and the unfinished one holds fewer tokens); the blocks that leaves empty, for the pool."""
        return self.cells.trim(slot, self.cells_for(last_offset)) if self.borrows else []

    def close(self, request_id: str) -> list[int]:
        """Forget the request's slot; the blocks that frees, for the caller to give back to the pool."""
        slot = self.slot_of.pop(request_id, None)
        if slot is None:
            return []
        for place in range(self.places):
            self.unbind(slot, place)
        self.free_slots.append(slot)
        self.slot_blocks[slot] = -1
        return self.blocks_of.pop(slot) + self.cells.trim(slot, 0)

    def held_blocks(self) -> int:
        """Pool blocks the window holds (slots' own blocks and the cells' blocks)."""
        return sum(map(len, list(self.blocks_of.values()))) + len(self.cells.free)

    @property
    def unit_bytes(self) -> int:
        """Bytes of one unit of a slot's storage: a cell where slots borrow, else a block."""
        return self.cells.cell_bytes if self.borrows else self.bytes_per_block

    def units(self, slot: int) -> list[int]:
        """Byte starts of ``slot``'s units (its cells in token order, or its blocks in order)."""
        if self.borrows:
            return self.cells.starts(slot)
        return [block * self.bytes_per_block for block in self.blocks_of.get(slot, [])]

    def copy_units(self, slot: int, data: torch.Tensor) -> None:
        """Put ``[n, unit_bytes]`` bytes (another slot's units, or parked ones) into ``slot``'s first n units."""
        for start, unit in zip(self.units(slot), data, strict=False):
            self.bytes[start : start + self.unit_bytes].copy_(unit)

    def unit_data(self, slot: int) -> torch.Tensor:
        """``[n, unit_bytes]``: the bytes of ``slot``'s units."""
        size = self.unit_bytes
        starts = self.units(slot)
        if not starts:
            return self.bytes.new_empty((0, size))
        return torch.stack([self.bytes[start : start + size] for start in starts])

    def bind(self, slot: int, place: int, group_id: int) -> None:
        """Reads of ``group_id`` come from ``place`` of ``slot`` (whatever that place held before is let go)."""
        if self.bound.get((slot, place)) == group_id and int(self.lookup[group_id]) == slot:
            return  # a running request's unfinished group, bound again every step
        self.unbind(slot, place)
        self.bound[(slot, place)] = group_id
        self.lookup[group_id], self.place_of[group_id] = slot, place

    def unbind(self, slot: int, place: int) -> None:
        group_id = self.bound.pop((slot, place), None)
        if group_id is not None and int(self.lookup[group_id]) == slot and int(self.place_of[group_id]) == place:
            self.lookup[group_id] = self.place_of[group_id] = -1

    def held(self, slot: int) -> dict[int, int]:
        """``{place: group id}`` of what ``slot`` holds."""
        return {place: gid for (s, place), gid in self.bound.items() if s == slot}

    def offsets(self, slots: torch.Tensor, places: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Where in ``bytes`` the rows of (slot, place, position in the group) start, for every layer's K and V at
        once: ``[layers, 2, n]`` (a step reads and writes the same rows in every layer, so its first layer finds
        them all; a kernel takes them as they are). ``groups``: the group each row holds (where the slot borrows,
        its page block hosts the group's first ``hosted_tokens`` tokens)."""
        layer_kv = torch.arange(self.layers * 2, device=slots.device)[:, None]
        if self.borrows:
            return self._borrowed_offsets(layer_kv, slots, positions, groups)
        rows = (layer_kv * self.places + places) * self.group + positions
        blocks = self.slot_blocks[slots.expand_as(rows), rows // self.rows_per_block]
        at = blocks * self.bytes_per_block + rows % self.rows_per_block * self.row_bytes
        return at.view(self.layers, 2, rows.shape[1])

    def _borrowed_offsets(
        self, layer_kv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        """``offsets`` of a borrowing window: a hosted token's row of layer ``l`` lies in its group's page block from
        ``hosted_row`` on (past that layer's page rows, on whole rows: torch's path reads rows through a strided
        view); later tokens' rows in the slot's own blocks, layer by layer."""
        hosted, row = self.hosted_tokens, self.row_bytes
        host_block = (groups // self.groups_per_block) * self.bytes_per_block
        first = hosted_row(layer_kv // 2, self.layers, hosted, self.rows_per_block)
        host = host_block + (first + (layer_kv % 2) * hosted + positions) * row
        cell = self.cells.at[slots, (positions - hosted).clamp(min=0)]
        if bool(((cell < 0) & (positions >= hosted)).any()):
            raise RuntimeError(
                "hf_vram KV window: a group's token past those its page block hosts has no window cell to go to; "
                "this is a bug in the paged cache's bookkeeping, and the batch stops here rather than compute wrong."
            )
        at = torch.where(positions < hosted, host, cell + layer_kv * row)
        return at.view(self.layers, 2, positions.shape[-1])

    def write(self, offsets: torch.Tensor, states: torch.Tensor) -> None:
        """Put ``[n, H, D]`` states as int8 rows at byte ``offsets`` (one layer's K or V: ``offsets(...)[layer,
        kv]``); hf_vram's kernel writes them in one pass where it is loaded, torch the same bytes elsewhere."""
        if kv_write.takes(states):
            kv_write.quantize_rows_int8(states, self.bytes, offsets)
        else:
            self.rows[self._block_rows(offsets)] = self.codec.encode(states)

    def read(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[n, H, D]`` in the model's dtype from the int8 rows at byte ``offsets``."""
        return self.codec.decode(self.rows[self._block_rows(offsets)], self.dtype)

    def _block_rows(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, row in the block) of rows at byte ``offsets``: one gather or scatter of whole rows through
        ``rows`` (torch's path), not one index per byte."""
        return offsets // self.bytes_per_block, offsets % self.bytes_per_block // self.row_bytes

    def as_stored(self, states: torch.Tensor) -> torch.Tensor:
        """``[n, H, D]`` states as the window would return them (what a whole group is quantized from)."""
        return self.codec.round_trip(states)

    def group_offsets(self, slots: torch.Tensor, places: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``offsets`` of the whole ``groups`` at (slot, place) pairs, each group's rows in order: ``[layers, 2,
        len(slots) * group]``, for ``read`` to return them as ``[len(slots) * group, H, D]``."""
        positions = torch.arange(self.group, device=slots.device).repeat(slots.numel())
        slots, places, groups = (x.repeat_interleave(self.group) for x in (slots, places, groups))
        return self.offsets(slots, places, positions, groups)
