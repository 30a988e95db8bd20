"""The pooled KV cache: a block pool shared by sequences and requests, and a Transformers ``Cache`` over it."""

from hf_vram.kvcache.cache import PooledKVCache
from hf_vram.kvcache.pool import KVCachePool, PoolExhaustedError

__all__ = ["KVCachePool", "PoolExhaustedError", "PooledKVCache"]
