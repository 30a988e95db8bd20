"""PooledKVCache inside ``generate``: same tokens as DynamicCache, no padding stored, sharing, release."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.kvcache import KVCachePool, PooledKVCache, PoolExhaustedError
from tests.tiny_models import TINY_ARCHS, build_tiny, sample_ids

DECODERS = [a for a in TINY_ARCHS if a != "bert"]


def _padded_batch(lengths=(20, 7, 13), seed=1):
    ids = sample_ids(len(lengths), max(lengths), seed=seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n :] = 1
        ids[row, : max(lengths) - n] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_matches_dynamic_cache_and_stores_no_padding(arch, dtype):
    model = build_tiny(arch)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, **kwargs)
    pool = KVCachePool.for_model(model, num_blocks=64, block_size=4, dtype=dtype)
    cache = PooledKVCache(pool)
    out = model.generate(ids, cache=cache, **kwargs)
    if dtype == "float32":
        assert torch.equal(out, reference)
    else:  # prefill attends to exact keys, so the first new token always agrees; later ones read int8 keys
        first = ids.shape[1] + 1
        assert torch.equal(out[:, :first], reference[:, :first]) and out.shape == reference.shape
    stats = pool.stats()
    assert stats["tokens_stored"] == sum((20, 7, 13)) + 3 * 11  # prompts + new tokens minus the last, no pads
    assert [r.pad for r in cache.rows] == [0, 13, 7]
    cache.release()
    assert pool.stats()["blocks_used"] == 0


def test_int8_cache_logits_stay_close():
    model = build_tiny("llama")
    ids = sample_ids(2, 24)
    pool = KVCachePool.for_model(model, num_blocks=64, block_size=4, dtype="int8")
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = PooledKVCache(pool)
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache).logits[:, -1]
    assert ((step - full).norm() / full.norm()).item() < 0.02


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_beam_search_and_num_return_sequences(arch):
    model = build_tiny(arch)
    ids, mask = _padded_batch((9, 5))
    pool = KVCachePool.for_model(model, num_blocks=128, block_size=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, **kwargs)
    assert torch.equal(model.generate(ids, cache=PooledKVCache(pool), **beams), model.generate(ids, **beams))
    torch.manual_seed(0)
    sampled_ref = model.generate(ids, do_sample=True, top_k=20, num_return_sequences=3, **kwargs)
    torch.manual_seed(0)
    with PooledKVCache(pool) as cache:
        sampled = model.generate(ids, cache=cache, do_sample=True, top_k=20, num_return_sequences=3, **kwargs)
        assert pool.stats()["shared_blocks"] > 0  # the 3 returned sequences of each prompt share its full blocks
    assert torch.equal(sampled, sampled_ref)
    import gc

    gc.collect()
    assert pool.stats()["blocks_used"] == 0  # beam forks and the collected caches gave every block back


def test_crop_then_continue_equals_a_fresh_run():
    model = build_tiny("llama")
    ids = sample_ids(1, 23)
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4)
    with torch.no_grad():
        cache = PooledKVCache(pool)
        model(ids, cache=cache)
        used = pool.blocks_used
        cache.crop(-10)
        assert cache.get_seq_length() == 13 and pool.blocks_used < used
        again = model(ids[:, 13:], cache=cache).logits
        fresh = model(ids).logits[:, 13:]
    torch.testing.assert_close(again, fresh, atol=1e-5, rtol=1e-5)


def test_shared_system_prompt_is_stored_once():
    model = build_tiny("llama")
    system = sample_ids(1, 64, seed=7)[0]
    prompts = [torch.cat([system, sample_ids(1, 5 + i, seed=20 + i)[0]]) for i in range(8)]
    pool = KVCachePool.for_model(model, num_blocks=256, block_size=16)
    caches = []
    for prompt in prompts:
        caches.append(PooledKVCache(pool))
        model.generate(prompt[None], cache=caches[-1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    stats = pool.stats()
    # 4 full system blocks stored once, referenced by all 8 requests.
    assert stats["shared_blocks"] == 4
    assert stats["blocks_used"] == 4 + sum(-(-(p.numel() + 3 - 64) // 16) for p in prompts)
    for c in caches:
        c.release()
    assert pool.stats()["blocks_used"] == 0


def test_exhausted_pool_raises_and_leaks_nothing():
    model = build_tiny("llama")
    pool = KVCachePool.for_model(model, num_blocks=4, block_size=4)
    cache = PooledKVCache(pool)
    with pytest.raises(PoolExhaustedError, match="raise num_blocks/max_memory"):
        model.generate(sample_ids(1, 10), cache=cache, max_new_tokens=20, do_sample=False, pad_token_id=0)
    cache.release()
    assert pool.stats()["blocks_used"] == 0


def test_pruned_model_with_per_layer_kv_heads():
    model = build_tiny("llama")
    hf_vram.optimize(model, {"pruning": {"enabled": True, "head_ratio": {"1": 0.75}, "method": "magnitude"}})
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4)
    assert [s.num_kv_heads for s in pool.layers] == [2, 1]
    ids = sample_ids(1, 9)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, cache=PooledKVCache(pool), max_new_tokens=6, do_sample=False, pad_token_id=0), ref)


def test_config_kv_section_pools_generate_through_both_doors(tiny_dirs):
    cfg = hf_vram.VramOptimizationConfig(
        quantization={"scheme": "int8"}, kv_cache={"enabled": True, "block_size": 8, "num_blocks": 40}
    )
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dirs["mistral"], quantization_config=cfg)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["mistral"])
    hf_vram.optimize(plain, {"kv_cache": {"enabled": True, "block_size": 8, "num_blocks": 40}})
    ids = sample_ids(2, 20)
    expected = AutoModelForCausalLM.from_pretrained(tiny_dirs["mistral"]).generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain.generate(ids, max_new_tokens=5, do_sample=False), expected)
    loaded.generate(ids, max_new_tokens=5, do_sample=False)
    for model in (loaded, plain):
        report = hf_vram.memory_report(model)
        assert report.by_kind["kv cache"] == 40 * model.hf_vram_kv_pool.bytes_per_block
        assert report.kv_cache["blocks_used"] == 0 and report.kv_cache["high_water_blocks"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage_with_prefix_sharing(dtype):
    model = build_tiny("llama").to(getattr(torch, dtype))
    prompt = sample_ids(1, 20)
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4)
    assert pool.dtype == getattr(torch, dtype)  # the model's KV dtype by default
    reference = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with PooledKVCache(pool) as first, PooledKVCache(pool) as second:
        assert torch.equal(model.generate(prompt, cache=first, max_new_tokens=5, do_sample=False, pad_token_id=0), reference)
        assert torch.equal(model.generate(prompt, cache=second, max_new_tokens=5, do_sample=False, pad_token_id=0), reference)
        assert pool.stats()["shared_blocks"] == 5  # the 20-token prompt's 5 full blocks, stored once
