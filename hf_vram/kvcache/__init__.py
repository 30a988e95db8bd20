"""The pooled KV cache: a block pool shared by sequences and requests, and a Transformers ``Cache`` over it.

Names load on first use: ``hf_vram.kvcache.paged_attention`` is imported while Transformers itself is still importing
model code (``hf_vram.hf.registration``), when this package must not import anything else.
"""

from hf_vram._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"PooledKVCache": ".cache", "KVCachePool": ".pool", "PoolExhaustedError": ".pool"})


__all__ = ["KVCachePool", "PoolExhaustedError", "PooledKVCache"]
