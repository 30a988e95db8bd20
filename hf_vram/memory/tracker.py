"""A device-agnostic peak-memory tracker for a block of code.

CUDA: exact, from the caching allocator's statistics. CPU: every tensor storage created inside the block is
tracked through a ``TorchDispatchMode`` and released when its last tensor dies (weak references), so the peak is
the largest sum of live tensor bytes allocated inside the block. Process RSS on a CPU is dominated by allocator
caching and the interpreter, which is why it is not used.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class PeakMemory:
    """Filled when the ``with`` block ends: ``peak_bytes`` above the start, ``retained_bytes`` still alive at the end."""

    device: str = "cpu"
    peak_bytes: int = 0
    retained_bytes: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._holders: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.current -= self._sizes.pop(key)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self._holders:
            self._holders[key] = 0
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._holders[key] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                self._track(t)
        return out


@contextmanager
def track_peak_memory(device: str | torch.device = "cpu"):
    """``with track_peak_memory() as peak: ...`` then read ``peak.peak_bytes``."""
    device = torch.device(device)
    result = PeakMemory(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
            result.retained_bytes = torch.cuda.memory_allocated(device) - start
        return
    tracker = _StorageTracker()
    try:
        with tracker:
            yield result
    finally:
        result.peak_bytes = tracker.peak
        result.retained_bytes = tracker.current
