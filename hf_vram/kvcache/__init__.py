"""The pooled KV cache: a block pool shared by sequences and requests, and a Transformers ``Cache`` over it."""

from hf_vram.kvcache.cache import PooledKVCache
from hf_vram.kvcache.paged_attention import register as _register_attention
from hf_vram.kvcache.pool import KVCachePool, PoolExhaustedError

_register_attention()

__all__ = ["KVCachePool", "PoolExhaustedError", "PooledKVCache"]
