"""``hf_vram.estimate``: weights, KV cache and peak activation bytes of a config, before loading any weights.

The model is built on the meta device (no memory, no data), shaped by the config (pruned sizes, quantized
layers), and its bytes counted tensor by tensor. One forward of ``batch x seq_len`` fake tokens (shapes only)
gives the KV cache layout (per-layer KV heads after pruning, sliding windows) and the activation peak, tracked
storage by storage by ``track_peak_memory``'s tracker: views are not new memory, and the K/V the forward leaves in
the cache is the KV figure, not activations too. With ``prefill_chunk`` the forward is the last chunk's, after the
history before it (the largest chunk: it attends to the most). ``MemoryEstimate.check(model, cache)`` then compares
with what a loaded model and a filled cache really hold.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from hf_vram.config import KVCacheSection, VramOptimizationConfig, as_config, parse_bytes
from hf_vram.fusion import attention as fused_attention
from hf_vram.kernels import history_attention
from hf_vram.kernels.segmented_attention import CAUSAL, segmented_attention
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.group_window import window_row_bytes
from hf_vram.kvcache.kivi import GROUP, WINDOWED_BITS, WindowedKVCodec, window_policy
from hf_vram.kvcache.layer_widths import wide_span, widening
from hf_vram.memory.report import memory_report
from hf_vram.memory.tracker import track_peak_memory
from hf_vram.planner.meta_model import build_meta, model_config, quantize_meta, shape_for_plan, tensor_bytes


@dataclass
class MemoryEstimate:
    """Estimated bytes on one device for ``batch`` sequences of ``seq_len`` tokens."""

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    batch: int
    seq_len: int
    kv_dtype: str
    kv_layers: list[tuple[int, int, int]] = field(default_factory=list)  # (kv heads, head dim, tokens kept)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, int | str]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_bytes": self.activation_bytes,
            "total_bytes": self.total_bytes,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "kv_dtype": self.kv_dtype,
        }

    def table(self) -> str:
        rows = [
            ("weights", self.weights_bytes),
            (f"KV cache ({self.kv_dtype})", self.kv_cache_bytes),
            ("activations (peak)", self.activation_bytes),
            ("total", self.total_bytes),
        ]
        width = max(len(r[0]) for r in rows)
        head = f"estimate for batch {self.batch} x {self.seq_len} tokens"
        return "\n".join([head] + [f"{name.ljust(width)}  {n / 2**20:10.2f} MiB" for name, n in rows])

    def check(self, model: nn.Module, cache=None, tolerance: float = 0.05) -> dict[str, float]:
        """Measured / estimated for weights (and the KV cache when one filled for this shape is given).

        Raises ``AssertionError`` naming the part that is off by more than ``tolerance``.
        """
        ratios = {"weights": memory_report(model).total / max(self.weights_bytes, 1)}
        if cache is not None:
            ratios["kv_cache"] = cache_bytes(cache) / max(self.kv_cache_bytes, 1)
        off = {k: v for k, v in ratios.items() if abs(v - 1) > tolerance}
        if off:
            raise AssertionError(f"hf_vram estimate: measured/estimated {off} is outside 1 +- {tolerance}.")
        return ratios


def cache_bytes(cache) -> int:
    """Bytes a filled cache holds: a ``PooledKVCache``/``KVCachePool`` (blocks in use) or a Transformers cache."""
    pool = getattr(cache, "pool", cache)
    if hasattr(pool, "stats"):
        stats = pool.stats()
        return int(stats["blocks_used"] * pool.bytes_per_block)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                total += t.numel() * t.element_size()
    return total


SHAPES_ATTENTION = "hf_vram_shapes"


def _fused_attention_shapes(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``hf_vram`` attention's memory, for a shapes-only forward (its mask probe reads values, which fake
    tensors have none of): SDPA's fused kernel on K/V with their own head count, given the mask when it was built
    whole (a chunk after its history: SDPA turns a boolean mask into a float one); masks built lazily, at most
    ``MASK_ELEMENTS`` at a time, are left out."""
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and query.shape[2] != key.shape[2] else None
    causal = mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHAPES_ATTENTION, _fused_attention_shapes)
AttentionMaskInterface.register(SHAPES_ATTENTION, fused_attention.lazy_sdpa_mask)
POOLED_SHAPES_ATTENTION = "hf_vram_pooled_shapes"


def _pooled_attention_shapes(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``hf_vram`` attention over hf_vram's pool (``kv_cache.enabled``), for a shapes-only forward: a chunk after
    its history reads that history a segment at a time (``kernels.history_attention``); here the history this
    forward's cache holds, copied segment by segment as the pool's gather copies it, the chunk against itself
    causal (no padding: an estimate's batch is unpadded). Anything else: the fused attention's stand-in."""
    past = key.shape[2] - query.shape[2]
    if past <= 0 or query.shape[2] == 1:
        return _fused_attention_shapes(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    def segments():
        for s in range(0, past, history_attention.SEGMENT):
            e = min(s + history_attention.SEGMENT, past)
            yield key[:, :, s:e].clone(), value[:, :, s:e].clone(), None
        yield key[:, :, past:], value[:, :, past:], CAUSAL

    out = segmented_attention(query, segments(), scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(POOLED_SHAPES_ATTENTION, _pooled_attention_shapes)
AttentionMaskInterface.register(POOLED_SHAPES_ATTENTION, fused_attention.lazy_sdpa_mask)


def _resolve_dtype(config: PretrainedConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) and dtype != "auto" else getattr(config, "dtype", None)
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, name) if isinstance(name, str) else torch.float32


def _kv_layers(model: nn.Module, batch: int, seq_len: int, chunk: int | None) -> tuple[list[tuple[int, int, int]], int]:
    """Per-layer (kv heads, head dim, tokens kept) and the activation peak, from one shapes-only forward.

    The meta model becomes fake CPU tensors (``FakeTensorMode``: no memory, no compute), so attention dispatches to
    the CPU kernels it would really use (a plain meta forward decomposes SDPA and counts a score matrix the flash
    kernel never builds).
    """
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        cache, activations = _prefill_peak(model, ids, chunk)
    layers = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.shape[2]) for layer in getattr(cache, "layers", [])]
    return layers, activations


@torch.no_grad()
def _prefill_peak(model: nn.Module, ids: torch.Tensor, chunk: int | None):
    """The filled cache and the activation peak of a prefill of ``ids``: the last ``chunk`` tokens after the others
    when chunked (the largest chunk: it attends to the most), the K/V it leaves in the cache not counted."""
    cache = DynamicCache(config=model.config)
    kwargs = {"cache": cache, "use_cache": True, "logits_to_keep": 1}
    history = ids.shape[1] - chunk if chunk and chunk < ids.shape[1] else 0
    if history:
        model(input_ids=ids[:, :history], **kwargs)
    with track_peak_memory() as peak:
        try:
            model(input_ids=ids[:, history:], **kwargs)
        except TypeError:  # encoders take no cache
            model(input_ids=ids)
            cache = None
    kv = [t for layer in getattr(cache, "layers", None) or [] for t in (layer.keys, layer.values)]
    return cache, peak.peak_excluding(kv)


def measure_activations(model: nn.Module, ids: torch.Tensor, prefill_chunk: int | None = None) -> int:
    """What ``estimate(..., prefill_chunk=...)`` predicts, measured on a loaded model: the CPU tracker's peak of a
    prefill of ``ids`` (its last chunk), the K/V cache left out."""
    return _prefill_peak(model, ids, prefill_chunk)[1]


def estimate(
    source: str | Path | PretrainedConfig | nn.Module,
    config: VramOptimizationConfig | dict | str | None = None,
    *,
    batch: int = 1,
    seq_len: int = 2048,
    dtype: torch.dtype | str | None = None,
    prefill_chunk: int | None = None,
) -> MemoryEstimate:
    """Bytes of ``source`` (a local folder, a config, or a model) under ``config``, with no weight loaded.

    ``config`` defaults to the hf_vram config saved with the model, if any. KV bytes: the model's dtype; the pooled
    cache's dtype and block rounding when ``kv_cache.enabled``; continuous batching's int8/int4/int2 pages (window
    included) when ``kv_cache.dtype`` asks for them without the pool. Activations: the peak of a prefill forward
    that keeps the last token's logits (what ``generate`` runs), or of its last ``prefill_chunk`` tokens
    (Transformers' ``prefill_chunk_size``), the KV cache not included. ``prefill_chunk`` defaults to the config's
    ``kv_cache.prefill_chunk``, which the loaded model's ``generate`` would use (the serving and long-context
    presets set 2048): an estimate of such a config without it counted a one-pass prefill that never runs.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("prefill_chunk", prefill_chunk or 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"hf_vram estimate: {name}={value!r} is invalid; use an int >= 1.")
    hf_config = model_config(source)
    if config is None:
        saved = getattr(hf_config, "quantization_config", None)
        saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
        config = saved if isinstance(saved, dict) and saved.get("quant_method") == "hf_vram" else {}
    plan = as_config(config)
    if prefill_chunk is None:
        prefill_chunk = plan.kv_cache.prefill_chunk
    torch_dtype = _resolve_dtype(hf_config, dtype)
    model = _shaped_model(hf_config, torch_dtype, plan)
    weights = tensor_bytes(quantize_meta(copy.deepcopy(model), plan))
    layers, activations = _kv_layers(model, batch, seq_len, prefill_chunk)
    kv_bytes, kv_dtype = _kv_bytes(layers, batch, seq_len, plan.kv_cache, torch_dtype)
    return MemoryEstimate(weights, kv_bytes, activations, batch, seq_len, kv_dtype, layers)


def _shaped_model(hf_config: PretrainedConfig, dtype: torch.dtype, plan: VramOptimizationConfig) -> nn.Module:
    """The meta model shaped by ``plan``, on the attention stand-in whose memory is the plan's: the fused attention's
    (not SDPA's expanded K/V and whole mask), over the pool the one whose chunks read their history in place."""
    model = shape_for_plan(build_meta(hf_config, dtype), plan)
    if plan.fusion.enabled and plan.fusion.attention == fused_attention.NAME:
        model.set_attn_implementation(POOLED_SHAPES_ATTENTION if plan.kv_cache.enabled else SHAPES_ATTENTION)
    return model


def context_bytes(
    model: nn.Module,
    config: VramOptimizationConfig,
    seq_len: int,
    chunks: Sequence[int | None],
    kv_dtypes: Sequence[str],
) -> tuple[dict[int | None, int], dict[str, int]]:
    """What one sequence of ``seq_len`` tokens adds to ``model`` (a loaded float model; only its config and dtype
    are read) under ``config``: the prefill's activation peak for each chunk size in ``chunks`` (None: one pass),
    and its KV cache for each storage in ``kv_dtypes`` (``KVCacheSection.storing``). The planner's inputs: the same
    shapes-only forward as ``estimate``, each chunk once, the KV storages all from its cache layout."""
    dtype = next(model.parameters()).dtype
    meta = _shaped_model(model.config, dtype, config)
    activations, layers = {}, []
    for chunk in chunks:
        layers, activations[chunk] = _kv_layers(copy.deepcopy(meta), 1, seq_len, chunk)
    kv = {name: _kv_bytes(layers, 1, seq_len, config.kv_cache.storing(name), dtype)[0] for name in kv_dtypes}
    return activations, kv


def _kv_bytes(layers, batch: int, seq_len: int, section: KVCacheSection, model_dtype: torch.dtype) -> tuple[int, str]:
    """DynamicCache keeps a sliding layer's window only; the pool keeps every token (the mask hides the old)."""
    if not section.enabled and section.dtype in ("int8", "int4", "int2"):
        return _page_bytes(layers, batch, int(section.dtype[3:]), section), f"{section.dtype} pages"
    if not section.enabled:
        elt = torch.empty(0, dtype=model_dtype).element_size()
        return sum(2 * batch * h * d * t * elt for h, d, t in layers), str(model_dtype).removeprefix("torch.")
    dtype = model_dtype if section.dtype == "auto" else getattr(torch, section.dtype)
    elt = torch.empty(0, dtype=dtype).element_size()
    scale = 4 if dtype == torch.int8 else 0
    total = 0
    per_block = 0
    for h, d, _ in layers:
        slots = math.ceil(seq_len / section.block_size) * section.block_size  # whole blocks per sequence
        total += 2 * batch * slots * h * (d * elt + scale)
        per_block += 2 * section.block_size * h * (d * elt + scale)
    label = f"pooled {str(dtype).removeprefix('torch.')}"
    device_tier = _device_tier_bytes(section, per_block)
    if device_tier is not None and total > device_tier:  # the rest waits in host memory (kv_cache.offload_memory)
        return device_tier, f"{label}, {(total - device_tier) / 2**20:.0f} MiB offloaded"
    return total, label


def _device_tier_bytes(section: KVCacheSection, per_block: int) -> int | None:
    """With ``offload_memory``, the pool's device blocks (less the null block) hold what the device keeps of the
    K/V; None without offload or without a device size."""
    if section.offload_memory is None or (section.num_blocks is None and section.max_memory is None):
        return None
    blocks = section.num_blocks if section.num_blocks is not None else parse_bytes(section.max_memory, "max_memory") // per_block
    return (blocks - 1) * per_block


def _page_bytes(layers, batch: int, bits: int, section: KVCacheSection) -> int:
    """Continuous batching's quantized pages: K and V rows per token, and for int4/int2 each sequence's window (its
    key groups' K and V in int8 rows, ``window_policy``); ``kv_cache.int8_layers`` (``int4_layers``) take
    ``wide_span`` rows a token."""
    total = 0
    wide_bits, chosen = widening(section)
    wide = set(range(chosen)) if isinstance(chosen, int) else set(chosen)  # a count: as many layers, any alike
    for i, (h, d, t) in enumerate(layers):
        if bits in WINDOWED_BITS:
            window = window_policy(bits, section).window_groups * GROUP * window_row_bytes(h, d)
            span = wide_span(bits, h, d, wide_bits) if i in wide else 1
            total += batch * 2 * (t * span * WindowedKVCodec(bits, h, d).row_bytes + window)
        else:
            total += batch * 2 * t * KVCodec(bits, h, d).row_bytes
    return total
