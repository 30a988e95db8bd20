"""The Triton paged-decode kernel equals the torch reference under TRITON_INTERPRET=1 (random shapes, dtypes)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels.triton_paged import paged_decode_reference, paged_decode_triton


def _case(seed, batch, hq, hkv, dim, block, dtype, quant):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 24
    lens = torch.randint(1, block * 5, (batch,), generator=g)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # scattered, non-contiguous blocks
    tables = perm[: batch * 5].view(batch, 5)
    q = torch.randn(batch, hq, dim, generator=g).to(dtype)
    if quant:
        keys = torch.randint(-127, 128, (hkv, num_blocks * block, dim), generator=g, dtype=torch.int8)
        values = torch.randint(-127, 128, (hkv, num_blocks * block, dim), generator=g, dtype=torch.int8)
        ks = torch.rand(hkv, num_blocks * block, generator=g) / 100
        vs = torch.rand(hkv, num_blocks * block, generator=g) / 100
        return q, keys, values, tables, lens, ks, vs
    keys = torch.randn(hkv, num_blocks * block, dim, generator=g).to(dtype)
    values = torch.randn(hkv, num_blocks * block, dim, generator=g).to(dtype)
    return q, keys, values, tables, lens, None, None


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "dim", "block", "dtype", "quant"),
    [
        (3, 9, 3, 64, 16, torch.float32, False),  # SmolLM2's GQA shape
        (2, 4, 4, 24, 8, torch.float32, False),  # multi-head, head_dim not a power of two
        (2, 6, 2, 32, 4, torch.bfloat16, False),
        (2, 8, 2, 16, 16, torch.float16, False),
        (3, 9, 3, 64, 16, torch.float32, True),  # int8 KV with per-token, per-head scales
    ],
)
def test_paged_decode_kernel_matches_reference(batch, hq, hkv, dim, block, dtype, quant):
    q, keys, values, tables, lens, ks, vs = _case(batch * 7 + dim, batch, hq, hkv, dim, block, dtype, quant)
    scale = dim**-0.5
    ref = paged_decode_reference(q, keys, values, tables, lens, block, scale, ks, vs)
    out = paged_decode_triton(q, keys, values, tables, lens, block, scale, ks, vs)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_reference_equals_plain_attention_over_the_gathered_cache():
    q, keys, values, tables, lens, _, _ = _case(3, 2, 4, 2, 8, 4, torch.float32, False)
    ref = paged_decode_reference(q, keys, values, tables, lens, 4, 0.5)
    for b in range(2):
        n = int(lens[b])
        slots = torch.tensor([int(tables[b, p // 4]) * 4 + p % 4 for p in range(n)])
        k = keys[:, slots].repeat_interleave(2, 0)  # [Hq, n, D]
        v = values[:, slots].repeat_interleave(2, 0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, scale=0.5)[:, 0]
        torch.testing.assert_close(ref[b], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_paged_attention_in_generate_matches_gather_path(dtype):
    """The model on attn_implementation='hf_vram_paged' decodes through the kernel (interpreted here)."""
    from hf_vram.kvcache import KVCachePool, PooledKVCache
    from tests.kvcache.test_cache import _padded_batch
    from tests.tiny_models import build_tiny

    model = build_tiny("qwen2")
    ids, mask = _padded_batch((11, 6))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4, dtype=dtype)
    gathered = model.generate(ids, cache=PooledKVCache(pool), output_scores=True, return_dict_in_generate=True, **kwargs)
    model.set_attn_implementation("hf_vram_paged")
    paged = model.generate(
        ids, cache=PooledKVCache(pool, paged_attention=True), output_scores=True, return_dict_in_generate=True, **kwargs
    )
    assert torch.equal(paged.sequences, gathered.sequences)
    for a, b in zip(paged.scores, gathered.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_paged_cache_without_paged_attention_is_loud():
    from hf_vram.kvcache import KVCachePool, PooledKVCache
    from tests.tiny_models import build_tiny, sample_ids

    model = build_tiny("llama")  # sdpa attention
    pool = KVCachePool.for_model(model, num_blocks=32, block_size=4)
    cache = PooledKVCache(pool, paged_attention=True)
    with pytest.raises(RuntimeError, match="attn_implementation='hf_vram_paged'"):
        model.generate(sample_ids(1, 5), cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    cache.release()
