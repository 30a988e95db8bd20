"""The pool's host tier (``offload_blocks`` / ``kv_cache.offload_memory``): the coldest full blocks move to host
memory when the device tier is full, stay readable and writable there, and generate over a small device tier gives
the tokens of a roomy one, on every read path (history segments, gathered decode, the paged decode attention)."""

from __future__ import annotations

import random

import pytest
import torch

import hf_vram
import tests.kvcache.test_pool as pool_tests
from hf_vram.kvcache import KVCachePool, PoolExhaustedError
from hf_vram.kvcache.pool import LayerShape
from tests.tiny_models import build_tiny

FUSED = {"attention": "hf_vram", "norms": False, "projections": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_random_operations_over_two_tiers_keep_every_invariant_and_value(monkeypatch, dtype):
    """The pool tests' random life (allocate, append, fork, copy-on-write, drop, truncate; every sequence's values
    checked) over 6 device blocks and 14 host blocks: blocks move to the host and back into use, none is lost."""
    moved = []
    monkeypatch.setattr(
        pool_tests,
        "_pool",
        lambda num_blocks=12, dtype=dtype: KVCachePool(
            [LayerShape(2, 3), LayerShape(1, 3)], num_blocks=6, block_size=pool_tests.BS, dtype=dtype, offload_blocks=14
        ),
    )
    original = KVCachePool._make_device_room
    monkeypatch.setattr(KVCachePool, "_make_device_room", lambda self, n: original(self, n) or moved.append(self.offloaded))
    rng = random.Random(7)
    names = ["new", "append", "append", "append", "append", "fork", "drop", "truncate"]
    pool_tests._run_ops([(rng.choice(names), rng.randrange(10**6)) for _ in range(3000)], content_every=1, max_seqs=6)
    assert max(moved) >= 5  # the host tier was used, not only the device's


def _offload_pool(device_blocks: int, host_blocks: int) -> KVCachePool:
    return KVCachePool([LayerShape(2, 3)], num_blocks=device_blocks, block_size=4, offload_blocks=host_blocks)


def test_only_full_blocks_move_oldest_first_and_a_full_host_names_the_fix():
    pool = _offload_pool(4, 3)
    old, new = pool.allocate(1), pool.allocate(1)
    pool.note_fill(old[0], 4), pool.note_fill(new[0], 4)
    (partial,) = pool.allocate(1)
    pool.note_fill(partial, 2)
    pool.allocate(1)  # the device tier (3 places) is full: the oldest full block moves
    assert pool.offloaded == 1 and pool.physical_slots(torch.tensor([old[0] * 4]))[0] >= 4 * 4
    assert pool.device_tables(torch.tensor([[old[0]]])) is None and pool.device_tables(torch.tensor([[partial]])) is not None
    with pytest.raises(PoolExhaustedError, match="could move to host memory.*raise num_blocks/max_memory"):
        pool.allocate(2)  # 2 more device places: only one full block is left to move
    pool.check_invariants()
    assert pool.offloaded == 1 and pool.blocks_used == 4  # all or nothing
    with pytest.raises(PoolExhaustedError, match="in host memory.*kv_cache.offload_memory"):
        pool.allocate(7)


@pytest.mark.parametrize("attention", ["hf_vram", "hf_vram_paged", "sdpa"])
def test_generate_over_a_small_device_tier_gives_a_roomy_pools_tokens(attention):
    """A 40-token prompt prefilled in chunks of 8 and 8 new tokens over 4-token blocks: 12 blocks, on a device tier
    of 5 and the host for the rest; the same tokens and logits as a pool that holds everything, everything freed
    after."""
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(5))
    tokens = {}
    for name, kv in (
        ("roomy", {"num_blocks": 64}),
        ("offload", {"num_blocks": 6, "offload_memory": "1MiB"}),
    ):
        config = {"kv_cache": {"enabled": True, "block_size": 4, "prefill_chunk": 8, **kv}}
        if attention != "sdpa":
            config["fusion"] = FUSED
        model = hf_vram.optimize(build_tiny("llama"), hf_vram.VramOptimizationConfig(**config))
        if attention != "sdpa":
            model.set_attn_implementation(attention)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        tokens[name] = out.sequences, torch.stack(out.logits)
        pool = model.hf_vram_kv_pool
        if name == "offload":
            assert pool.num_blocks == 6 and pool.offload_blocks > 24 and pool.high_water >= 24
            assert pool.stats()["bytes_offload_reserved"] > 0
        assert pool.blocks_used == 0 and pool.offloaded == 0
        pool.check_invariants([])
    assert torch.equal(tokens["offload"][0], tokens["roomy"][0])
    assert (tokens["offload"][1] - tokens["roomy"][1]).abs().max() < 1e-5


def test_offload_memory_is_checked_by_name():
    with pytest.raises(ValueError, match="offload_memory"):
        hf_vram.VramOptimizationConfig(kv_cache={"enabled": True, "offload_memory": "lots"})
