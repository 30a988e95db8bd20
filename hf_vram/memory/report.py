"""``memory_report(model)``: bytes held by a model's parameters and buffers, by kind, each storage counted once."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hf_vram.quant.apply import QUANTIZED_MODULES

KINDS = ("quantized weights", "scales", "float weights", "sparse weights", "embeddings", "norms", "biases", "other", "kv cache")


def _classify(module: nn.Module, tensor_name: str, tensor: torch.Tensor) -> str:
    if isinstance(module, QUANTIZED_MODULES):
        if tensor_name == "bias":
            return "biases"
        return "quantized weights" if not tensor.is_floating_point() else "scales"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if type(module).__name__ == "BlockSparseLinear" and tensor_name != "bias":
        return "sparse weights"
    cls = type(module).__name__.lower()
    if "norm" in cls:
        return "norms"
    if tensor_name == "bias":
        return "biases"
    if tensor_name == "weight" and tensor.dim() >= 2:
        return "float weights"
    return "other"


@dataclass
class MemoryReport:
    """Bytes by kind; ``total`` counts every storage once even when shared (tied weights)."""

    by_kind: dict[str, int] = field(default_factory=lambda: OrderedDict((k, 0) for k in KINDS))
    by_dtype: dict[str, int] = field(default_factory=dict)
    kv_cache: dict[str, float] = field(default_factory=dict)  # the pool's stats, when a pool was reported

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict[str, int]:
        return {**self.by_kind, "total": self.total}

    def table(self) -> str:
        rows = [("kind", "MiB", "share")]
        total = max(self.total, 1)
        for kind, n in self.by_kind.items():
            if n:
                rows.append((kind, f"{n / 2**20:.2f}", f"{100 * n / total:.1f}%"))
        rows.append(("total", f"{self.total / 2**20:.2f}", "100.0%"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def memory_report(model: nn.Module, kv_pool=None) -> MemoryReport:
    """Bytes of every parameter and buffer reachable from ``model``, by kind, shared storages counted once.

    The KV pool (``kv_pool``, or the one the config's ``kv_cache`` stage attached to the model) is counted by the
    bytes it reserves, and its stats (blocks used/free, fragmentation, sharing, high-water mark) are attached.
    """
    report = MemoryReport()
    kv_pool = kv_pool if kv_pool is not None else getattr(model, "hf_vram_kv_pool", None)
    if kv_pool is not None:
        report.kv_cache = kv_pool.stats()
        report.by_kind["kv cache"] += int(report.kv_cache["bytes_reserved"])
    seen: set[tuple[str, int]] = set()
    for module in model.modules():
        extra = getattr(module, "extra_storage", None)
        for kind, dtype, nbytes in extra() if extra is not None else ():  # kernel-owned copies: no parameter/buffer
            report.by_kind[kind] += nbytes
            report.by_dtype[dtype] = report.by_dtype.get(dtype, 0) + nbytes
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor is None or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            nbytes = storage.nbytes()
            report.by_kind[_classify(module, name, tensor)] += nbytes
            report.by_dtype[str(tensor.dtype).removeprefix("torch.")] = (
                report.by_dtype.get(str(tensor.dtype).removeprefix("torch."), 0) + nbytes
            )
    return report
