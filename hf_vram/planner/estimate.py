"""``hf_vram.estimate``: weights, KV cache and peak activation bytes of a config, before loading any weights.

The model is built on the meta device (no memory, no data), shaped by the config (pruned sizes, quantized
layers), and its bytes counted tensor by tensor. One forward of ``batch x seq_len`` meta tokens (shapes only)
gives the KV cache layout (per-layer KV heads after pruning, sliding windows) and the activation peak, tracked
tensor by tensor as in ``track_peak_memory``. ``MemoryEstimate.check(model, cache)`` then compares with what a
loaded model and a filled cache really hold.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache, PretrainedConfig

from hf_vram.config import VramOptimizationConfig, as_config
from hf_vram.memory.report import memory_report
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


class _MetaPeak(TorchDispatchMode):
    """Live bytes of tensors created inside the block (views and in-place results are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                n = t.numel() * t.element_size()
                self.current += n
                self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._free, n)
        return out


def _resolve_dtype(config: PretrainedConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) and dtype != "auto" else getattr(config, "dtype", None)
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, name) if isinstance(name, str) else torch.float32


def _kv_layers(model: nn.Module, batch: int, seq_len: int) -> tuple[list[tuple[int, int, int]], int]:
    """Per-layer (kv heads, head dim, tokens kept) and the activation peak, from one shapes-only forward.

    The meta model becomes fake CPU tensors (``FakeTensorMode``: no memory, no compute), so attention dispatches to
    the CPU kernels it would really use (a plain meta forward decomposes SDPA and counts a score matrix the flash
    kernel never builds).
    """
    cache = DynamicCache(config=model.config)
    tracker = _MetaPeak()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        layers, peak = _traced_forward(model, ids, cache, tracker)
    return layers, peak


def _traced_forward(model, ids, cache, tracker) -> tuple[list[tuple[int, int, int]], int]:
    with torch.no_grad(), tracker:
        kwargs = {"cache": cache, "use_cache": True, "logits_to_keep": 1}
        try:
            model(input_ids=ids, **kwargs)
        except TypeError:  # encoders take no cache
            model(input_ids=ids)
            cache = None
    layers = []
    for layer in getattr(cache, "layers", None) or []:
        keys = layer.keys
        layers.append((keys.shape[1], keys.shape[3], keys.shape[2]))
    return layers, tracker.peak


def estimate(
    source: str | Path | PretrainedConfig | nn.Module,
    config: VramOptimizationConfig | dict | str | None = None,
    *,
    batch: int = 1,
    seq_len: int = 2048,
    dtype: torch.dtype | str | None = None,
) -> MemoryEstimate:
    """Bytes of ``source`` (a local folder, a config, or a model) under ``config``, with no weight loaded.

    ``config`` defaults to the hf_vram config saved with the model, if any. KV bytes: the model's dtype, or the
    pooled cache's dtype and block rounding when ``kv_cache.enabled``. Activations: the peak of a prefill forward
    that keeps the last token's logits (what ``generate`` runs).
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"hf_vram estimate: {name}={value!r} is invalid; use an int >= 1.")
    hf_config = model_config(source)
    if config is None:
        saved = getattr(hf_config, "quantization_config", None)
        saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
        config = saved if isinstance(saved, dict) and saved.get("quant_method") == "hf_vram" else {}
    plan = as_config(config)
    torch_dtype = _resolve_dtype(hf_config, dtype)
    model = shape_for_plan(build_meta(hf_config, torch_dtype), plan)
    weights = tensor_bytes(quantize_meta(copy.deepcopy(model), plan))
    layers, activations = _kv_layers(model, batch, seq_len)
    kv_bytes, kv_dtype = _kv_bytes(layers, batch, seq_len, plan, torch_dtype)
    return MemoryEstimate(weights, kv_bytes, activations, batch, seq_len, kv_dtype, layers)


def _kv_bytes(layers, batch: int, seq_len: int, plan: VramOptimizationConfig, model_dtype: torch.dtype) -> tuple[int, str]:
    """DynamicCache keeps a sliding layer's window only; the pool keeps every token (the mask hides the old)."""
    section = plan.kv_cache
    if not section.enabled:
        elt = torch.empty(0, dtype=model_dtype).element_size()
        return sum(2 * batch * h * d * t * elt for h, d, t in layers), str(model_dtype).removeprefix("torch.")
    dtype = model_dtype if section.dtype == "auto" else getattr(torch, section.dtype)
    elt = torch.empty(0, dtype=dtype).element_size()
    scale = 4 if dtype == torch.int8 else 0
    total = 0
    for h, d, _ in layers:
        slots = math.ceil(seq_len / section.block_size) * section.block_size  # whole blocks per sequence
        total += 2 * batch * slots * h * (d * elt + scale)
    return total, f"pooled {str(dtype).removeprefix('torch.')}"
