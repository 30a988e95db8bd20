"""A device-agnostic peak-memory tracker for a block of code.

CUDA: exact, from the caching allocator's statistics. CPU: every tensor storage created inside the block is
tracked through a ``TorchDispatchMode`` and released when its last tensor dies (weak references), so the peak is
the largest sum of live tensor bytes allocated inside the block. Process RSS on a CPU is dominated by allocator
caching and the interpreter, which is why it is not used. Storages are told apart by their ``StorageImpl``, which
fake tensors (``FakeTensorMode``: shapes, no data) have too, so ``hf_vram.estimate`` traces with the same tracker; and
the order of allocations and frees is kept, so the peak can be read again without some storages
(``PeakMemory.peak_excluding``: an activation peak without the KV cache the forward filled).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(tensor: torch.Tensor) -> int:
    """What tells a tensor's storage apart from every other live one (a view shares its base's)."""
    return tensor.untyped_storage()._cdata


@dataclass
class PeakMemory:
    """Filled when the ``with`` block ends: ``peak_bytes`` above the start, ``retained_bytes`` still alive at the end."""

    device: str = "cpu"
    peak_bytes: int = 0
    retained_bytes: int = 0
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (storage serial, +-bytes), CPU only
    live: dict[int, int] = field(default_factory=dict, repr=False)  # storage key -> serial, alive at the end

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def peak_excluding(self, tensors) -> int:
        """The peak again, without the storages of ``tensors`` (alive at the end of the block, e.g. a filled
        cache's keys and values). CPU tracking only."""
        if self.device != "cpu":
            raise ValueError("hf_vram: peak_excluding reads the CPU tracker's timeline; CUDA keeps none.")
        skip = {self.live.get(storage_key(t)) for t in tensors} - {None}
        current = peak = 0
        for serial, delta in self.events:
            if serial not in skip:
                current += delta
                peak = max(peak, current)
        return peak


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._holders: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.serials: dict[int, int] = {}
        self.events: list[tuple[int, int]] = []

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            size = self._sizes.pop(key)
            self.current -= size
            self.events.append((self.serials.pop(key), -size))

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            key = storage_key(tensor)
            size = tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if key not in self._holders:
            self._holders[key] = 0
            self._sizes[key] = size
            self.serials[key] = len(self.events)
            self.events.append((self.serials[key], size))
            self.current += size
            self.peak = max(self.peak, self.current)
        self._holders[key] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ids = {id(t) for t in inputs}
        input_storages = {storage_key(t) for t in inputs if t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in ids or t.device.type == "meta":
                continue
            key = storage_key(t)
            if key in self._holders or key not in input_storages:  # a view of a storage made before: not new
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
        result.events, result.live = tracker.events, dict(tracker.serials)
