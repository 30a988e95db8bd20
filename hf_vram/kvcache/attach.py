"""The pipeline's KV stage: make ``model.generate`` use a pooled cache by default when the config asks for it.

Transformers' ``cache_implementation`` names form a closed set, so the stage wraps ``generate`` on the model
instance: a call that brings no cache of its own gets a ``PooledKVCache`` over the model's pool (built on first
use, from the ``kv_cache`` section), released when the call returns; with the ``hf_vram`` attentions its prefill
chunks read their history from the pool in place (``history_attention``). A call passing ``cache=``/``past_key_values=``,
``cache_implementation=`` (or a generation config naming one, as ``transformers serve --compile`` sets) or
``use_cache=False`` is left alone.

``kv_cache.prefill_chunk`` becomes the model's ``generation_config.prefill_chunk_size`` (Transformers' own chunked
prefill, as users pass it), unless that already names one: the caller's choice stands.

The pool does not compile: its block tables are Python lists that grow as sequences do, so a compiled decode step
would be re-traced at every new block. A call asking for compiled decode (``compile_config=``) without choosing a
cache is refused with the alternative (``cache_implementation="static"``), rather than silently run eagerly.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from hf_vram.config import KVCacheSection
from hf_vram.kvcache.cache import PooledKVCache
from hf_vram.kvcache.pool import KVCachePool

POOL_ATTR = "hf_vram_kv_pool"


def model_pool(model: nn.Module, section: KVCacheSection) -> KVCachePool:
    pool = getattr(model, POOL_ATTR, None)
    if pool is None:
        budget = section.max_memory if section.num_blocks is None else None
        pool = KVCachePool.for_model(
            model,
            num_blocks=section.num_blocks,
            max_memory=budget,
            block_size=section.block_size,
            dtype=section.dtype,
            offload_memory=section.offload_memory,
        )
        setattr(model, POOL_ATTR, pool)
    return pool


def install_pooled_generate(model: nn.Module, section: KVCacheSection) -> None:
    if getattr(model.generate, "_hf_vram_pooled", False):
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        own = ("cache", "past_key_values", "cache_implementation")
        # a generation config (passed, or the model's own) that names a cache or a compiled decode chooses for itself
        gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        chosen = getattr(gen, "cache_implementation", None) is not None
        if any(kwargs.get(k) is not None for k in own) or kwargs.get("use_cache") is False or chosen:
            return original(*args, **kwargs)
        if kwargs.get("compile_config") is not None or getattr(gen, "compile_config", None) is not None:
            raise ValueError(
                "hf_vram: the pooled KV cache (kv_cache.enabled) does not compile: its block tables grow with the "
                "sequences, so every new block would re-trace the graph. For compiled decode pass "
                "cache_implementation='static' with compile_config; to decode over the pool, drop compile_config."
            )
        cache = PooledKVCache(model_pool(model, section), history_in_place=True)  # with the hf_vram attentions
        try:
            return original(*args, cache=cache, **kwargs)
        finally:
            cache.release()

    generate._hf_vram_pooled = True
    model.generate = generate


def install_prefill_chunk(model: nn.Module, section: KVCacheSection) -> None:
    """Prefill in chunks of ``section.prefill_chunk`` tokens by default (see the module docstring)."""
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "prefill_chunk_size", None) is None:
        gen.prefill_chunk_size = section.prefill_chunk
