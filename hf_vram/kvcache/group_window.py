"""The window of the int4/int2 pages: each running request's int8 rows (a scale per token and head, ``KVCodec``) of
the key groups its pages do not answer for yet, inside pool blocks.

The window is int8, not the model's dtype: it halves what a running request holds beyond its pages (for SmolLM2 at
int4, 2 pages of 64 tokens instead of 4; 1 where it borrows its group's page block, below), and int8 K/V is within 0.1% perplexity of bfloat16. Every key group is
quantized from these int8 rows (a group a prefill writes whole, from the states rounded the same way), so what a read
returns does not depend on which path wrote it.

A key group (``group`` tokens of one page) is quantized per channel, which needs all of its tokens; until then its
tokens wait here. A request's window has ``places`` groups (``kivi.window_policy``): the unfinished group and, at
int2 by default, the request's first group (the attention sink) and its last whole groups (``lag``), which read
from here while their pages already hold them quantized. Each request holds one slot: ``blocks_per_slot`` blocks
taken from the same pool as its pages when it first allocates, and given back when it is freed. Where a page is one
key group and the window holds only the unfinished group (int4 by default), the slot borrows that group's own page
block for its first ``hosted`` rows: the block is the request's alone (a block is shared only once complete) and
its page rows are written only when the group is sealed, layer by layer, and a layer's page rows (int4/int2) lie
before its window rows (int8, wider) in the block, so sealing a layer overwrites only window rows of layers sealed
already. The slot then takes one block beside its pages instead of two (SmolLM2 at int4, pages of 64 tokens), so
more requests fit a budget; swaps and forks carry the borrowed rows inside the page block. The scheduler counts
them like pages (``WindowedFullAttentionAllocator.needs_new_blocks``), so the window never grows past the KV budget:
a request whose window does not fit waits like one whose pages do not. A slot's bytes are rows of one token's K or V
for one layer (``row = ((layer * 2 + kv) * places + place) * group + offset``), addressed by byte offsets in the
cache tensor, found for every layer's K and V at once (``offsets``: a step's rows are the same in every layer), which
hf_vram's kernels write and read directly (torch's path goes through a strided ``[blocks, rows_per_block, row_bytes]``
view, one gather or scatter of whole rows), and a fork copies a slot like a block. ``lookup`` and
``place_of`` map a group (its id in the pages) to the slot and place that hold it, or -1.
"""

from __future__ import annotations

import math

import torch

from hf_vram.kernels import kv_write
from hf_vram.kvcache.codec import KVCodec


def window_row_bytes(heads: int, head_dim: int) -> int:
    """Bytes of one token's K (or V) for one layer in the window."""
    return KVCodec(8, heads, head_dim).row_bytes


def slot_size(layers: int, places: int, group: int, row_bytes: int, bytes_per_block: int, borrow: bool) -> tuple[int, int]:
    """``(hosted, blocks)`` of one request's window: the rows that live in its unfinished group's own page block
    (``borrow``: a page is one group; only with a window of that group alone) and the pool blocks of its own for
    the rest (at least one)."""
    rows, rows_per_block = layers * 2 * places * group, bytes_per_block // row_bytes
    hosted = min(rows, rows_per_block) if borrow and places == 1 else 0
    return hosted, max(1, math.ceil((rows - hosted) / rows_per_block))


class GroupWindow:
    """Slots of pool blocks holding unfinished key groups; ``lookup`` maps a group id to the slot that holds it."""

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
        # hosted: the first rows live in the page block of the group they hold (see the module docstring)
        self.hosted, self.blocks_per_slot = slot_size(layers, places, group, self.row_bytes, bytes_per_block, borrow_group_block)
        self.groups_per_block = groups_per_block  # group ids per block (Transformers' physical index / group)
        device = cache_tensor.device
        max_slots = num_blocks // self.blocks_per_slot + 1
        self.slot_blocks = torch.zeros(max_slots, self.blocks_per_slot, dtype=torch.long, device=device)
        self.lookup = torch.full((num_groups,), -1, dtype=torch.long, device=device)  # group id -> slot
        self.place_of = torch.full((num_groups,), -1, dtype=torch.long, device=device)  # group id -> place in it
        self.slot_of: dict[str, int] = {}  # request -> slot
        self.blocks_of: dict[int, list[int]] = {}  # slot -> its blocks
        self.bound: dict[tuple[int, int], int] = {}  # (slot, place) -> the group it holds
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.layers = layers
        blocks_in_tensor = self.bytes.numel() // bytes_per_block
        self.rows = self.bytes.as_strided(
            (blocks_in_tensor, self.rows_per_block, self.row_bytes), (bytes_per_block, self.row_bytes, 1)
        )

    def open(self, request_id: str, blocks: list[int]) -> int:
        """Give ``request_id`` a slot made of ``blocks`` (taken from the pool by the caller)."""
        slot = self.free_slots.pop()
        self.slot_of[request_id], self.blocks_of[slot] = slot, blocks
        self.slot_blocks[slot] = torch.tensor(blocks, dtype=torch.long)
        return slot

    def close(self, request_id: str) -> list[int]:
        """Forget the request's slot; its blocks, for the caller to give back to the pool."""
        slot = self.slot_of.pop(request_id, None)
        if slot is None:
            return []
        for place in range(self.places):
            self.unbind(slot, place)
        self.free_slots.append(slot)
        return self.blocks_of.pop(slot)

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
        them all; a kernel takes them as they are). ``groups``: the group each row holds (its page block hosts the
        first ``hosted`` rows)."""
        layer_kv = torch.arange(self.layers * 2, device=slots.device)[:, None]
        rows = (layer_kv * self.places + places) * self.group + positions
        own = (rows - self.hosted).clamp(min=0)
        blocks = self.slot_blocks[slots.expand_as(rows), own // self.rows_per_block]
        at = blocks * self.bytes_per_block + own % self.rows_per_block * self.row_bytes
        if self.hosted:
            host = (groups // self.groups_per_block).expand_as(rows) * self.bytes_per_block + rows * self.row_bytes
            at = torch.where(rows < self.hosted, host, at)
        return at.view(self.layers, 2, rows.shape[1])

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
