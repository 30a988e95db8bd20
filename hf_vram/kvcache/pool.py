"""``KVCachePool``: one preallocated store of fixed-size KV blocks, shared by every sequence that uses it.

Each block holds ``block_size`` tokens of K and V for every layer (per-layer head counts may differ, e.g. after
pruning). A free list gives O(1) allocate and free; blocks are reference-counted so that sequences can share them
(a common prompt prefix, beam-search forks); full blocks can be found by the content hash of the prefix they end,
so a new sequence with the same prefix reuses them instead of storing them again. Block 0 is a reserved block of
zeros that padded positions read. ``int8`` storage keeps one float32 scale per token and head.
All bookkeeping is guarded by one lock, so several threads can generate over one pool.

Offload (``offload_blocks``): a second tier of blocks in host memory for contexts larger than the device budget.
Block ids are logical; each maps to a place in the device tier or the host tier (``physical_slots``). New blocks
always take device space; when there is none, the coldest full blocks (the least recently allocated: a long
context's oldest tokens) move to the host, only they, and stay readable where they are: a gather (a history
segment, ``hf_vram.kernels.history_attention``) brings just the host rows it needs to the device, a write to a host
block lands there. Unlike Transformers' ``OffloadedCache`` (every layer's whole cache moves to and from the device
each step) the hot part stays put and only cold blocks travel, a segment at a time.
"""

from __future__ import annotations

import contextlib
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
        offload_blocks: int = 0,
        offload_device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(offload_blocks, int) or offload_blocks < 0:
            raise ValueError(f"hf_vram kv pool: offload_blocks={offload_blocks!r} is invalid; allowed: an integer >= 0.")
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
        self.offload_blocks = offload_blocks
        self.total_blocks = num_blocks + offload_blocks  # logical block ids
        # Head-major [heads, slots, dim]: a batch-1 gather is already the [1, heads, tokens, dim] layout SDPA wants.
        self.keys, self.values, self.key_scales, self.value_scales = self._storage(num_blocks, self.device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        host = self._storage(offload_blocks, torch.device(offload_device), pin) if offload_blocks else None
        self.host_keys, self.host_values, self.host_key_scales, self.host_value_scales = host or (None,) * 4
        for tensors in self._stores(host=False):
            for t in tensors:
                t[:, :block_size].zero_()  # the null block: what padded positions read
        self.lock = threading.RLock()
        self.freed = threading.Condition(self.lock)
        self._free = list(range(self.total_blocks - 1, NULL_BLOCK, -1))  # a stack: O(1) pop and push
        self._refs = [0] * self.total_blocks
        self._fill = [0] * self.total_blocks  # tokens written into each block
        # offload: logical block -> physical (device tier: < num_blocks; host tier: num_blocks + i), free places
        self._where = [NULL_BLOCK] + [-1] * (self.total_blocks - 1) if offload_blocks else list(range(num_blocks))
        self._where_t = torch.tensor(self._where, dtype=torch.long, device=self.device) if offload_blocks else None
        self._device_free = [] if not offload_blocks else list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._host_free = list(range(self.total_blocks - 1, num_blocks - 1, -1))
        self._born = [0] * self.total_blocks  # allocation order: the oldest full blocks are the coldest
        self._clock = 0
        self.offloaded = 0  # logical blocks now in the host tier
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
        offload_memory: int | str | None = None,
    ) -> KVCachePool:
        """A pool shaped for ``model``; sized by ``num_blocks``, or by a byte budget ``max_memory`` (e.g. "512MiB").

        With neither, it holds 16,384 tokens. ``dtype`` defaults to the model's KV dtype; ``"int8"`` quantizes.
        ``offload_memory``: host memory for the coldest blocks when the device tier is full (see the module docstring).
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
        offload_blocks = 0
        if offload_memory is not None:
            offload_blocks = parse_bytes(offload_memory, "kv pool offload_memory") // cls.bytes_per_block_for(
                shapes, block_size, dtype
            )
        pool = cls(shapes, num_blocks, block_size, dtype, device, offload_blocks)
        pool.model_config = model.config  # whose attention reads the pool in place (PooledKVCache(history_in_place))
        layer_types = getattr(model.config, "layer_types", None)
        if layer_types:
            pool.sliding = [t == "sliding_attention" for t in layer_types][: len(shapes)]
        elif getattr(model.config, "sliding_window", None):
            pool.sliding = [True] * len(shapes)
        return pool

    def _storage(self, blocks: int, device: torch.device, pin: bool = False):
        """K, V (and for int8 their scales) for ``blocks`` blocks of every layer on ``device``."""
        slots = blocks * self.block_size

        def empty(*shape, dtype):
            return torch.empty(*shape, dtype=dtype, device=device, pin_memory=pin)

        keys = [empty(s.num_kv_heads, slots, s.head_dim, dtype=self.dtype) for s in self.layers]
        values = [empty(s.num_kv_heads, slots, s.head_dim, dtype=self.dtype) for s in self.layers]
        if not self.quantized:
            return keys, values, None, None
        key_scales = [empty(s.num_kv_heads, slots, dtype=torch.float32) for s in self.layers]
        return keys, values, key_scales, [empty(s.num_kv_heads, slots, dtype=torch.float32) for s in self.layers]

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
        """``n`` fresh blocks (refcount 1) in the device tier, all or nothing (moving the coldest full blocks to the
        host tier when the device has no room); raises ``PoolExhaustedError`` if fewer are free."""
        with self.lock:
            if n > len(self._free):
                raise PoolExhaustedError(
                    f"hf_vram kv pool: {n} block(s) needed, {len(self._free)} free of {self.total_blocks - 1}"
                    + (f" ({self.offload_blocks} of them in host memory)" if self.offload_blocks else "")
                    + "; release finished caches, raise num_blocks/max_memory (or kv_cache.offload_memory), or serve "
                    "many requests with model.generate_batch (continuous batching), which waits for blocks to free up."
                )
            if self.offload_blocks:
                self._make_device_room(n)
            blocks = [self._free.pop() for _ in range(n)]
            for b in blocks:
                self._refs[b], self._fill[b] = 1, 0
                self._clock += 1
                self._born[b] = self._clock
                if self.offload_blocks:
                    self._place(b, self._device_free.pop())
            self.high_water = max(self.high_water, self.blocks_used)
            return blocks

    def _place(self, block: int, physical: int) -> None:
        self._where[block] = physical
        self._where_t[block] = physical

    def _make_device_room(self, n: int) -> None:
        """Move the coldest full device blocks to the host tier until ``n`` device places are free; a sixteenth of
        the device tier at least when it can, so that a long prefill or decode does not search for cold blocks at
        every new block."""
        short = n - len(self._device_free)
        if short <= 0:
            return
        on_device = (b for b in range(1, self.total_blocks) if self._refs[b] and self._where[b] < self.num_blocks)
        full = sorted((b for b in on_device if self._fill[b] == self.block_size), key=self._born.__getitem__)
        if len(full) < short or len(self._host_free) < short:
            raise PoolExhaustedError(
                f"hf_vram kv pool: {n} device block(s) needed, {len(self._device_free)} free, and only "
                f"{min(len(full), len(self._host_free))} full block(s) could move to host memory "
                f"({len(self._host_free)} host places free); raise num_blocks/max_memory, the device tier."
            )
        cold = full[: min(max(short, self.num_blocks // 16), len(full), len(self._host_free))]
        for b in cold:
            device, host = self._where[b], self._host_free.pop()
            self._copy_rows(device, host)
            self._place(b, host)
            self._device_free.append(device)
            self.offloaded += 1

    def _stores(self, host: bool) -> list[list[torch.Tensor]]:
        """One tier's per-layer K, V, K scales, V scales (the scale lists empty unless int8)."""
        if host:
            return [self.host_keys, self.host_values, self.host_key_scales or [], self.host_value_scales or []]
        return [self.keys, self.values, self.key_scales or [], self.value_scales or []]

    def _tier(self, physical: int) -> tuple[list, int]:
        """The tensors (K, V, their scales) holding ``physical`` and its block index in them."""
        on_host = physical >= self.num_blocks
        return self._stores(on_host), physical - self.num_blocks * on_host

    def _copy_rows(self, src: int, dst: int) -> None:
        """Every layer's rows of physical block ``src`` into physical block ``dst`` (either tier)."""
        (src_tensors, i), (dst_tensors, j) = self._tier(src), self._tier(dst)
        for sources, targets in zip(src_tensors, dst_tensors, strict=True):
            for a, b in zip(sources, targets, strict=True):
                b[:, self.slot_range(j)] = a[:, self.slot_range(i)].to(b.device)  # blocking: the host reads it next

    def physical_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Logical slots -> physical ones (device tier below ``num_blocks * block_size``, host tier above)."""
        if not self.offload_blocks:
            return slots
        bs = self.block_size
        return self._where_t[slots // bs] * bs + slots % bs

    def device_tables(self, tables: torch.Tensor) -> torch.Tensor | None:
        """Block tables in device places, for kernels that read the device tier directly; None when a block is in
        host memory (the caller gathers instead)."""
        if not self.offload_blocks:
            return tables
        physical = self._where_t[tables.long()]
        return None if bool((physical >= self.num_blocks).any()) else physical.to(tables.dtype)

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
                    if self.offload_blocks:
                        physical = self._where[b]
                        on_host = physical >= self.num_blocks
                        (self._host_free if on_host else self._device_free).append(physical)
                        self.offloaded -= on_host
                        self._place(b, -1)
            self.freed.notify_all()

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def copy_on_write(self, block: int) -> int:
        """A private copy of a shared block (all layers), dropping this holder's reference to the original."""
        with self.lock:
            (new,) = self.allocate(1)
            self._copy_rows(self._where[block], self._where[new])
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
    def _placements_held(self):
        """With a host tier, the lock, so that no other thread moves a block between finding and using its place."""
        return self.lock if self.offload_blocks else contextlib.nullcontext()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[heads, n, dim]`` at flat (logical) ``slots`` of ``layer``."""
        with self._placements_held():
            self._write(layer, slots, k, v)

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        codes = []
        for x in (k, v):
            if self.quantized:
                scale = x.float().abs().amax(-1).clamp_min(1e-8) / 127
                codes.append((torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale))
            else:
                codes.append((x.to(self.dtype), None))
        physical = self.physical_slots(slots)
        on_host = physical >= self.num_blocks * self.block_size if self.offloaded else None
        parts = [(self._tensors(False, layer), physical, None)]
        if on_host is not None and bool(on_host.any()):
            host_slots = physical[on_host] - self.num_blocks * self.block_size
            parts = [
                (self._tensors(False, layer), physical[~on_host], ~on_host),
                (self._tensors(True, layer), host_slots, on_host),
            ]
        for (stores, scales), where, pick in parts:
            for store, scale_store, (code, scale) in zip(stores, scales, codes, strict=True):
                code = code if pick is None else code[:, pick]
                store.index_copy_(1, where.to(store.device), code.to(store.device))
                if scale_store is not None:
                    scale = scale if pick is None else scale[:, pick]
                    scale_store.index_copy_(1, where.to(store.device), scale.to(store.device))

    def _tensors(self, host: bool, layer: int) -> tuple[tuple, tuple]:
        """``((keys, values), (key scales, value scales))`` of ``layer`` in one tier (scales None unless int8)."""
        keys, values, key_scales, value_scales = self._stores(host)
        scales = (key_scales[layer], value_scales[layer]) if self.quantized else (None, None)
        return (keys[layer], values[layer]), scales

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at (logical) ``slots``: ``[heads, n, dim]`` for flat slots ``[n]``; ``[batch, heads, tokens,
        dim]`` (contiguous, what attention reads) for a ``[batch, tokens]`` table, in one copy. Rows in the host
        tier are copied to the device for this gather only."""
        with self._placements_held():
            return self._gather(layer, slots, dtype)

    def _gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        physical = self.physical_slots(slots)
        if not self.offloaded:
            return self._gather_tier(False, layer, physical, dtype)
        edge = self.num_blocks * self.block_size
        on_host = physical >= edge
        if not bool(on_host.any()):
            return self._gather_tier(False, layer, physical, dtype)
        host_k, host_v = self._gather_tier(True, layer, torch.where(on_host, physical - edge, 0).cpu(), dtype)
        host_k, host_v = host_k.to(self.device), host_v.to(self.device)
        if bool(on_host.all()):
            return host_k, host_v
        k, v = self._gather_tier(False, layer, torch.where(on_host, 0, physical), dtype)
        pick = on_host[:, None, :, None] if slots.dim() == 2 else on_host[None, :, None]
        return torch.where(pick, host_k, k), torch.where(pick, host_v, v)

    def _gather_tier(self, host: bool, layer: int, slots: torch.Tensor, dtype: torch.dtype):
        (keys, values), (key_scales, value_scales) = self._tensors(host, layer)
        heads, total, dim = keys.shape
        rows = slots if slots.dim() == 1 else slots[:, None, :]
        index = (torch.arange(heads, device=slots.device)[:, None] * total + rows).reshape(-1)
        shape = (heads, slots.numel(), dim) if slots.dim() == 1 else (slots.shape[0], heads, slots.shape[1], dim)
        k = keys.view(-1, dim).index_select(0, index).view(shape)
        v = values.view(-1, dim).index_select(0, index).view(shape)
        if self.quantized:
            k = k.to(dtype) * key_scales.view(-1).index_select(0, index).view(shape[:-1]).to(dtype)[..., None]
            v = v.to(dtype) * value_scales.view(-1).index_select(0, index).view(shape[:-1]).to(dtype)[..., None]
            return k, v
        return k.to(dtype), v.to(dtype)

    # -- accounting ------------------------------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        return self.total_blocks - 1 - len(self._free)

    @property
    def blocks_free(self) -> int:
        return len(self._free)

    def stats(self) -> dict[str, float]:
        with self.lock:
            used = [b for b in range(1, self.total_blocks) if self._refs[b] > 0]
            tokens = sum(self._fill[b] for b in used)
            per_block = self.bytes_per_block
            return {
                "bytes_reserved": per_block * self.num_blocks,
                "bytes_offload_reserved": per_block * self.offload_blocks,
                "bytes_used": per_block * len(used),
                "blocks_total": self.total_blocks - 1,
                "offload_blocks": self.offload_blocks,
                "offloaded_blocks": self.offloaded,
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
            for b in range(1, self.total_blocks):
                if (b in free) != (self._refs[b] == 0):
                    raise AssertionError(f"block {b}: refcount {self._refs[b]} but free={b in free}")
            if self.offload_blocks:
                held = [self._where[b] for b in range(self.total_blocks) if self._refs[b] or b == NULL_BLOCK]
                places = held + self._device_free + self._host_free
                if sorted(places) != list(range(self.total_blocks)) or -1 in held:
                    raise AssertionError("offload: device and host places are lost or held twice")
            if holders is not None:
                counts = [0] * self.total_blocks
                for blocks in holders:
                    for b in blocks:
                        counts[b] += 1
                if counts[1:] != self._refs[1:]:
                    raise AssertionError("refcounts differ from the holders' block lists")
