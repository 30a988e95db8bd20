"""Token cells of a borrowing int4 window: the rows of an unfinished key group past those its page block hosts,
one cell per token, in pool blocks shared by every request's window.

A borrowing window (``group_window``) keeps an unfinished group's first ``hosted_tokens`` tokens in the group's own
page block; the rest need room elsewhere, growing a token at a time until the group is sealed, when they die. A whole
block per request for them (what the window took before) costs each running request a block from its group's 35th
token to its 64th (for SmolLM2 at int4: 31 of 64 tokens; 30 in 108-byte rows, 0.47 of a block on average); a cell
per token costs what the tokens take (0.31 of a block a running request in 108-byte rows, blocks shared with free cells
included, sampled through the int4 run of ``benchmarks/batching.py``): a cell is one token's K and V rows for every layer (token-major, so a request's first extra tokens
need its first cells only), and a block holds ``per_block`` of them (33 for SmolLM2), shared by the requests whose
groups are past their hosted tokens. A block goes back to the pool once none of its cells is taken. Cells are taken
from the fullest block first, so the requests' cells pack into few blocks.
"""

from __future__ import annotations

import math

import torch


class WindowCells:
    """Cells of ``cell_bytes`` in pool blocks of ``bytes_per_block``; ``at[slot, i]``: the byte where slot's ``i``-th
    cell starts (-1: none), what the window's offsets read."""

    def __init__(self, bytes_per_block: int, cell_bytes: int, max_slots: int, cells_per_slot: int, device: torch.device) -> None:
        self.bytes_per_block, self.cell_bytes = bytes_per_block, cell_bytes
        self.per_block = bytes_per_block // cell_bytes
        if self.per_block == 0:
            raise ValueError(
                f"hf_vram KV window: a block of {bytes_per_block} bytes cannot hold one token's K and V rows of every "
                f"layer ({cell_bytes} bytes); use a larger ContinuousBatchingConfig.page_size."
            )
        self.at = torch.full((max_slots, max(1, cells_per_slot)), -1, dtype=torch.long, device=device)
        self.free: dict[int, list[int]] = {}  # a block the cells hold -> its free cells (indices in the block)
        self.of: dict[int, list[tuple[int, int]]] = {}  # slot -> its cells (block, index), in token order

    @property
    def blocks(self) -> list[int]:
        """The pool blocks the cells hold."""
        return list(self.free)

    def free_count(self) -> int:
        return sum(map(len, self.free.values()))

    def held(self, slot: int) -> int:
        return len(self.of.get(slot, ()))

    def blocks_needed(self, more: int) -> int:
        """Pool blocks that ``more`` new cells need beyond the free cells of the blocks held."""
        return math.ceil(max(0, more - self.free_count()) / self.per_block)

    def grow(self, slot: int, count: int, new_blocks: list[int]) -> None:
        """``slot`` holds ``count`` cells (at least), ``new_blocks`` from the pool added first (``blocks_needed``
        of the missing ones)."""
        for block in new_blocks:
            self.free[block] = list(range(self.per_block - 1, -1, -1))
        missing = count - self.held(slot)
        if missing > self.free_count():
            raise RuntimeError(
                f"hf_vram KV window: {missing} cells needed and {self.free_count()} free; the scheduler was told "
                "fewer blocks than the window takes (a bug in the paged cache's bookkeeping): the batch stops here."
            )
        if missing <= 0:
            return
        cells = self.of.setdefault(slot, [])
        while len(cells) < count:
            block = min((b for b, f in self.free.items() if f), key=lambda b: len(self.free[b]))  # the fullest
            index = self.free[block].pop()
            self.at[slot, len(cells)] = block * self.bytes_per_block + index * self.cell_bytes
            cells.append((block, index))

    def trim(self, slot: int, keep: int) -> list[int]:
        """``slot`` keeps its first ``keep`` cells; the blocks left with no cell taken, for the pool."""
        cells = self.of.get(slot, [])
        emptied = []
        while len(cells) > keep:
            block, index = cells.pop()
            self.at[slot, len(cells)] = -1
            self.free[block].append(index)
            if len(self.free[block]) == self.per_block:
                del self.free[block]
                emptied.append(block)
        if not cells:
            self.of.pop(slot, None)
        return emptied

    def starts(self, slot: int) -> list[int]:
        """Byte starts of ``slot``'s cells, in token order."""
        return [block * self.bytes_per_block + index * self.cell_bytes for block, index in self.of.get(slot, ())]
