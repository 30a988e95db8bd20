"""Chunked prefill over the pool: chunks read their history in place (a segment at a time), give one prefill's
logits, share every full block of a prompt, and fail whole."""

from __future__ import annotations

import pytest
import torch

import hf_vram
import hf_vram.fusion.attention as fused
import hf_vram.kernels.history_attention as history
from hf_vram.kvcache import KVCachePool, PooledKVCache, PoolExhaustedError
from hf_vram.kvcache.cache import _Row
from tests.kvcache.test_cache import _padded_batch
from tests.tiny_models import build_tiny

FUSED = {"attention": "hf_vram", "norms": False, "projections": False}


def _fused_llama(attention: str = "hf_vram"):
    model = build_tiny("llama")
    hf_vram.optimize(model, hf_vram.VramOptimizationConfig(fusion=FUSED))
    model.set_attn_implementation(attention)
    return model


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _chunked_logits(model, cache, ids, mask, chunk: int, start: int = 0) -> torch.Tensor:
    """Forwards over ``ids[:, start:]`` in chunks, as ``generate(prefill_chunk_size=chunk)`` runs them."""
    pos, out = _positions(mask), []
    with torch.no_grad():
        for s in range(start, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            kw = dict(attention_mask=mask[:, :e], position_ids=pos[:, s:e], cache=cache, use_cache=True)
            out.append(model(input_ids=ids[:, s:e], **kw).logits)
    return torch.cat(out, dim=1)


def _spy_gathers(monkeypatch, pool) -> list[int]:
    widths, gather = [], pool.gather
    monkeypatch.setattr(pool, "gather", lambda layer, slots, dtype: widths.append(slots.shape[-1]) or gather(layer, slots, dtype))
    return widths


@pytest.mark.parametrize("lazy", [False, True], ids=["whole mask", "lazy mask"])
@pytest.mark.parametrize("attention", ["hf_vram", "hf_vram_paged"])
def test_chunks_read_their_history_in_place_and_give_one_prefills_logits(monkeypatch, attention, lazy):
    """Left-padded rows, chunks of 6 over a pool of 4-token blocks (chunks straddle blocks), history read 5 tokens
    at a time; with lazy masks they are built a few query rows at a time."""
    monkeypatch.setattr(history, "SEGMENT", 5)
    if lazy:
        monkeypatch.setattr(fused, "MASK_ELEMENTS", 16)
        monkeypatch.setattr(history, "MASK_ELEMENTS", 64)
    model = _fused_llama(attention)
    ids, mask = _padded_batch()
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    pool = KVCachePool.for_model(model, num_blocks=64, block_size=4)
    widths = _spy_gathers(monkeypatch, pool)
    cache = PooledKVCache(pool, history_in_place=True)
    chunked = _chunked_logits(model, cache, ids, mask, 6)
    real = mask.bool()
    assert (chunked[real] - whole[real]).abs().max() < 1e-5
    assert widths and max(widths) <= 5  # never the whole history at once
    gathered = PooledKVCache(pool)  # the copying path, for contrast: the whole history per layer
    _chunked_logits(model, gathered, ids, mask, 6)
    assert max(widths) == ids.shape[1]
    cache.release(), gathered.release()
    pool.check_invariants()


def test_pooled_generate_chunks_in_place_and_shares_every_chunks_blocks(monkeypatch):
    """Through the config (fused attention, the pool, prefill_chunk): the tokens of an unchunked generate, the
    attention reads history in place, and a second request with the same prompt shares all its full blocks."""
    calls = []
    monkeypatch.setattr(fused, "attend", lambda *a: calls.append(1) or history.attend(*a))
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    reference = build_tiny("llama").generate(ids, max_new_tokens=8, do_sample=False)
    config = {"fusion": FUSED, "kv_cache": {"enabled": True, "block_size": 4, "num_blocks": 64, "prefill_chunk": 8}}
    model = hf_vram.optimize(build_tiny("llama"), hf_vram.VramOptimizationConfig(**config))
    assert model.generation_config.prefill_chunk_size == 8
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), reference)
    assert len(calls) == 4 * model.config.num_hidden_layers  # chunks 2-5, every layer

    pool = KVCachePool.for_model(model, num_blocks=64, block_size=4)
    first, second = PooledKVCache(pool, history_in_place=True), PooledKVCache(pool, history_in_place=True)
    for cache in (first, second):
        model.generate(ids, cache=cache, max_new_tokens=1, do_sample=False)
    assert pool.stats()["shared_blocks"] == 40 // 4  # every full block of the prompt, not only the first chunk's
    assert first.block_tables()[0][:10] == second.block_tables()[0][:10]
    first.release(), second.release()
    pool.check_invariants()


def test_a_model_on_another_attention_gets_the_gathered_history():
    """The pool's model runs SDPA: its chunks get the history gathered, never a chunk without its history."""
    model = build_tiny("llama")
    ids, mask = _padded_batch((12, 12))
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask).logits
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4)
    cache = PooledKVCache(pool, history_in_place=True)
    assert (_chunked_logits(model, cache, ids, mask, 8) - whole).abs().max() < 1e-5
    assert history._LOCAL.history is None  # nothing was handed over
    cache.release()


def test_a_chunk_the_pool_cannot_hold_changes_nothing():
    """The second chunk needs more blocks than are free: row 0 gets its 5, row 1 (whose partial block another cache
    shares) copies that block and runs out. It raises, and every row, fill and refcount is as before: row 0's blocks
    given back and its partial block's fill restored, row 1's copy-on-write undone."""
    model = _fused_llama()
    pool = KVCachePool.for_model(model, num_blocks=13, block_size=4)
    ids = torch.randint(3, 300, (2, 26), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    cache = PooledKVCache(pool, history_in_place=True)
    _chunked_logits(model, cache, ids[:, :6], mask[:, :6], 6)  # 2 blocks a row, the second half full
    other = PooledKVCache(pool)
    other.rows.append(_Row(list(cache.rows[1].blocks), cache.rows[1].length))
    pool.incref(cache.rows[1].blocks)
    state = lambda: (cache.block_tables(), [r.length for r in cache.rows], pool.stats() | {"high_water_blocks": 0})  # noqa: E731
    before = state()
    with pytest.raises(PoolExhaustedError, match="raise num_blocks/max_memory"):
        _chunked_logits(model, cache, ids, mask, 20, start=6)  # 20 more tokens a row: 5 blocks each (+1 copy), 8 free
    assert pool.high_water == 12  # it did get that far
    assert state() == before
    pool.check_invariants(cache.block_tables() + other.block_tables())
    other.release(), cache.release()
    assert pool.stats()["blocks_used"] == 0
