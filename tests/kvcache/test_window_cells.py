"""``WindowCells``: token cells of borrowing int4 windows, packed into pool blocks that the windows share."""

import pytest
import torch

from hf_vram.kvcache.window_cells import WindowCells


def test_cells_fill_the_fullest_block_first_and_a_block_goes_back_only_when_empty():
    cells = WindowCells(bytes_per_block=100, cell_bytes=24, max_slots=3, cells_per_slot=6, device=torch.device("cpu"))
    assert cells.per_block == 4 and cells.blocks_needed(3) == 1
    cells.grow(0, 3, [7])
    assert cells.starts(0) == [700, 724, 748] and cells.at[0, :4].tolist() == [700, 724, 748, -1]
    assert cells.blocks_needed(2) == 1  # one free cell in block 7, the other needs a block
    cells.grow(1, 2, [2])
    assert cells.starts(1) == [772, 200]  # block 7's last cell before the new block's
    assert cells.blocks_needed(3) == 0 and sorted(cells.blocks) == [2, 7]
    assert cells.trim(0, 1) == [] and cells.held(0) == 1 and cells.at[0, 1] == -1
    assert cells.trim(1, 0) == [2] and cells.blocks == [7]  # block 2 held nothing else: back to the pool
    assert cells.trim(0, 0) == [7] and not cells.blocks and not cells.of


def test_growing_past_the_free_cells_without_the_blocks_is_a_named_error():
    cells = WindowCells(bytes_per_block=100, cell_bytes=24, max_slots=2, cells_per_slot=6, device=torch.device("cpu"))
    cells.grow(0, 4, [0])
    with pytest.raises(RuntimeError, match="bookkeeping"):
        cells.grow(1, 1, [])
    assert cells.held(1) == 0 and cells.held(0) == 4 and 1 not in cells.of


def test_a_block_too_small_for_one_cell_names_the_fix():
    with pytest.raises(ValueError, match="page_size"):
        WindowCells(bytes_per_block=10, cell_bytes=24, max_slots=1, cells_per_slot=1, device=torch.device("cpu"))
