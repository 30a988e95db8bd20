"""The pooled KV cache: a block pool shared by sequences and requests, and a Transformers ``Cache`` over it.

Names load on first use: ``hf_vram.kvcache.paged_attention`` is imported while Transformers itself is still importing
model code (``hf_vram.hf.registration``), when this package must not import anything else.
"""

import importlib

_SOURCES = {"PooledKVCache": "cache", "KVCachePool": "pool", "PoolExhaustedError": "pool"}


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(f"hf_vram.kvcache.{_SOURCES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_vram.kvcache' has no attribute {name!r}")


__all__ = ["KVCachePool", "PoolExhaustedError", "PooledKVCache"]
