"""``KVCachePool``: one preallocated store of fixed-size KV blocks, shared by every sequence that uses it.

Each block holds ``block_size`` tokens of K and V for every layer (per-layer head counts may differ, e.g. after
pruning). A free list gives O(1) allocate and free; blocks are reference-counted so that sequences can share them
(a common prompt prefix, beam-search forks); full blocks can be found by the content hash of the prefix they end,
so a new sequence with the same prefix reuses them instead of storing them again. Block 0 is a reserved block of
zeros that padded positions read. ``int8`` storage keeps one float32 scale per token and head.
All bookkeeping is guarded by one lock, so several threads can generate over one pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from hf_vram.config import parse_bytes

NULL_BLOCK = 0


class PoolExhaustedError(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


@dataclass(frozen=True)
class LayerShape:
    num_kv_heads: int
    head_dim: int


def observe_kv_shapes(model: nn.Module) -> tuple[list[LayerShape], torch.dtype, torch.device]:
    """Per-layer KV head counts and head dim, observed from a one-token forward (exact for pruned models too)."""
    from transformers import DynamicCache

    param = next(model.parameters())
    probe = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device), cache=probe, use_cache=True)
    shapes = []
    for layer in probe.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4:
            raise NotImplementedError(
                f"hf_vram kv pool: cache layer {type(layer).__name__} holds no [batch, heads, tokens, dim] keys; "
                "this architecture's cache (linear attention, cross attention) is not supported by the pool."
            )
        shapes.append(LayerShape(keys.shape[1], keys.shape[3]))
    return shapes, probe.layers[0].keys.dtype, param.device


class KVCachePool:
    """Fixed-size blocks of K/V for all layers, a free list, refcounts and a prefix-hash table."""

    def __init__(
        self,
        layers: list[LayerShape],
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"hf_vram kv pool: block_size={block_size!r} is invalid; allowed: a power of two.")
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"hf_vram kv pool: num_blocks={num_blocks!r} is invalid; allowed: an integer >= 2.")
        if isinstance(dtype, str):
            if dtype not in ("int8", "float32", "bfloat16", "float16"):
                raise ValueError(f"hf_vram kv pool: dtype={dtype!r} is invalid; allowed: int8, float32, bfloat16, float16.")
            dtype = getattr(torch, dtype)
        self.layers = list(layers)
        self.sliding = [False] * len(self.layers)  # sliding-window layers (set by for_model from the config)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.quantized = dtype == torch.int8
        self.dtype = dtype
        self.device = torch.device(device)
        slots = num_blocks * block_size
        # Head-major [heads, slots, dim]: a batch-1 gather is already the [1, heads, tokens, dim] layout SDPA wants.
        self.keys = [torch.empty(s.num_kv_heads, slots, s.head_dim, dtype=dtype, device=self.device) for s in self.layers]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.key_scales = self.value_scales = None
        if self.quantized:
            self.key_scales = [torch.empty(s.num_kv_heads, slots, device=self.device) for s in self.layers]
            self.value_scales = [torch.empty_like(s) for s in self.key_scales]
        for tensors in (self.keys, self.values, self.key_scales or [], self.value_scales or []):
            for t in tensors:
                t[:, :block_size].zero_()  # the null block: what padded positions read
        self.lock = threading.RLock()
        self.freed = threading.Condition(self.lock)
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # a stack: O(1) pop and push
        self._refs = [0] * num_blocks
        self._fill = [0] * num_blocks  # tokens written into each block
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.high_water = 0
        self.model_config = None  # set by for_model

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        num_blocks: int | None = None,
        max_memory: int | str | None = None,
        block_size: int = 16,
        dtype: torch.dtype | str | None = None,
    ) -> KVCachePool:
        """A pool shaped for ``model``; sized by ``num_blocks``, or by a byte budget ``max_memory`` (e.g. "512MiB").

        With neither, it holds 16,384 tokens. ``dtype`` defaults to the model's KV dtype; ``"int8"`` quantizes.
        """
        if num_blocks is not None and max_memory is not None:
            raise ValueError("hf_vram kv pool: give num_blocks or max_memory, not both.")
        shapes, model_dtype, device = observe_kv_shapes(model)
        dtype = model_dtype if dtype in (None, "auto") else dtype
        if num_blocks is None:
            if max_memory is None:
                num_blocks = 16384 // block_size + 1
            else:
                per_block = cls.bytes_per_block_for(shapes, block_size, dtype)
                num_blocks = parse_bytes(max_memory, "kv pool max_memory") // per_block
                if num_blocks < 2:
                    raise ValueError(
                        f"hf_vram kv pool: max_memory={max_memory!r} holds {num_blocks} block(s) of {per_block} bytes; "
                        "at least 2 are needed (one is the reserved null block). Raise max_memory."
                    )
        pool = cls(shapes, num_blocks, block_size, dtype, device)
        pool.model_config = model.config  # whose attention reads the pool in place (PooledKVCache(history_in_place))
        layer_types = getattr(model.config, "layer_types", None)
        if layer_types:
            pool.sliding = [t == "sliding_attention" for t in layer_types][: len(shapes)]
        elif getattr(model.config, "sliding_window", None):
            pool.sliding = [True] * len(shapes)
        return pool

    @staticmethod
    def bytes_per_block_for(shapes: list[LayerShape], block_size: int, dtype: torch.dtype | str) -> int:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        elt = torch.empty(0, dtype=dtype).element_size()
        scale = 4 if dtype == torch.int8 else 0
        return sum(2 * block_size * s.num_kv_heads * (s.head_dim * elt + scale) for s in shapes)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_block_for(self.layers, self.block_size, self.dtype)

    # -- allocation ------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (refcount 1), all or nothing; raises ``PoolExhaustedError`` if fewer are free."""
        with self.lock:
            if n > len(self._free):
                raise PoolExhaustedError(
                    f"hf_vram kv pool: {n} block(s) needed, {len(self._free)} free of {self.num_blocks - 1}; "
                    "release finished caches, raise num_blocks/max_memory, or serve many requests with "
                    "model.generate_batch (continuous batching), which waits for blocks to free up."
                )
            blocks = [self._free.pop() for _ in range(n)]
            for b in blocks:
                self._refs[b], self._fill[b] = 1, 0
            self.high_water = max(self.high_water, self.blocks_used)
            return blocks

    def incref(self, blocks: list[int]) -> None:
        with self.lock:
            for b in blocks:
                if self._refs[b] <= 0:
                    raise RuntimeError(f"hf_vram kv pool: block {b} is not allocated; it cannot be shared.")
                self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block with none left returns to the free list."""
        with self.lock:
            for b in blocks:
                if b == NULL_BLOCK or self._refs[b] <= 0:
                    raise RuntimeError(f"hf_vram kv pool: double free of block {b}.")
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    h = self._hash_of.pop(b, None)
                    if h is not None and self._by_hash.get(h) == b:
                        del self._by_hash[h]
                    self._free.append(b)
            self.freed.notify_all()

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def copy_on_write(self, block: int) -> int:
        """A private copy of a shared block (all layers), dropping this holder's reference to the original."""
        with self.lock:
            (new,) = self.allocate(1)
            src, dst = self.slot_range(block), self.slot_range(new)
            for tensors in (self.keys, self.values, self.key_scales or [], self.value_scales or []):
                for t in tensors:
                    t[:, dst] = t[:, src]
            self._fill[new] = self._fill[block]
            self.free([block])
            return new

    def slot_range(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

    def note_fill(self, block: int, tokens: int) -> None:
        self._fill[block] = max(self._fill[block], tokens)

    def truncate_fill(self, block: int, tokens: int) -> None:
        self._fill[block] = tokens

    # -- prefix sharing --------------------------------------------------------------------------------------
    def lookup(self, content_hash: int) -> int | None:
        """A block already holding this prefix (with a new reference taken), or None."""
        with self.lock:
            b = self._by_hash.get(content_hash)
            if b is None:
                return None
            self._refs[b] += 1
            return b

    def register(self, content_hash: int, block: int) -> None:
        """Publish a full, completely written block under the hash of the prefix it ends."""
        with self.lock:
            if self._refs[block] > 0 and content_hash not in self._by_hash:
                self._by_hash[content_hash] = block
                self._hash_of[block] = content_hash

    def unpublish(self, block: int) -> None:
        """Withdraw a block from prefix lookup (its tail is about to be rewritten)."""
        with self.lock:
            h = self._hash_of.pop(block, None)
            if h is not None and self._by_hash.get(h) == block:
                del self._by_hash[h]

    # -- data ------------------------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[heads, n, dim]`` at flat ``slots`` of ``layer``."""
        if self.quantized:
            for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
                scale = x.float().abs().amax(-1).clamp_min(1e-8) / 127
                store[layer].index_copy_(1, slots, torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8))
                scales[layer].index_copy_(1, slots, scale)
        else:
            self.keys[layer].index_copy_(1, slots, k.to(self.dtype))
            self.values[layer].index_copy_(1, slots, v.to(self.dtype))

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``slots``: ``[heads, n, dim]`` for flat slots ``[n]``; ``[batch, heads, tokens, dim]``
        (contiguous, what attention reads) for a ``[batch, tokens]`` table, in one copy."""
        heads, total, dim = self.keys[layer].shape
        rows = slots if slots.dim() == 1 else slots[:, None, :]
        index = (torch.arange(heads, device=slots.device)[:, None] * total + rows).reshape(-1)
        shape = (heads, slots.numel(), dim) if slots.dim() == 1 else (slots.shape[0], heads, slots.shape[1], dim)
        k = self.keys[layer].view(-1, dim).index_select(0, index).view(shape)
        v = self.values[layer].view(-1, dim).index_select(0, index).view(shape)
        if self.quantized:
            k = k.to(dtype) * self.key_scales[layer].view(-1).index_select(0, index).view(shape[:-1]).to(dtype)[..., None]
            v = v.to(dtype) * self.value_scales[layer].view(-1).index_select(0, index).view(shape[:-1]).to(dtype)[..., None]
            return k, v
        return k.to(dtype), v.to(dtype)

    # -- accounting ------------------------------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def blocks_free(self) -> int:
        return len(self._free)

    def stats(self) -> dict[str, float]:
        with self.lock:
            used = [b for b in range(1, self.num_blocks) if self._refs[b] > 0]
            tokens = sum(self._fill[b] for b in used)
            per_block = self.bytes_per_block
            return {
                "bytes_reserved": per_block * self.num_blocks,
                "bytes_used": per_block * len(used),
                "blocks_total": self.num_blocks - 1,
                "blocks_used": len(used),
                "blocks_free": len(self._free),
                "tokens_stored": tokens,
                "fragmentation": 1 - tokens / (len(used) * self.block_size) if used else 0.0,
                "shared_blocks": sum(1 for b in used if self._refs[b] > 1),
                "high_water_blocks": self.high_water,
                "block_size": self.block_size,
                "bytes_per_block": per_block,
            }

    def check_invariants(self, holders: list[list[int]] | None = None) -> None:
        """Free list and refcounts agree (and, given every holder's block list, refcounts are exact)."""
        with self.lock:
            free = set(self._free)
            if len(free) != len(self._free) or NULL_BLOCK in free:
                raise AssertionError("free list holds duplicates or the null block")
            for b in range(1, self.num_blocks):
                if (b in free) != (self._refs[b] == 0):
                    raise AssertionError(f"block {b}: refcount {self._refs[b]} but free={b in free}")
            if holders is not None:
                counts = [0] * self.num_blocks
                for blocks in holders:
                    for b in blocks:
                        counts[b] += 1
                if counts[1:] != self._refs[1:]:
                    raise AssertionError("refcounts differ from the holders' block lists")
