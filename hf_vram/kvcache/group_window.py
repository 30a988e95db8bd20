"""The window of a KIVI-style paged cache: the tokens of key groups not yet full, in the model's dtype.

A key group (``GROUP`` tokens of one page) is quantized per channel, which needs all of its tokens; until then its
tokens live here, one slot per group being written, for every layer of the allocator's group. A running request
holds at most one slot (its last, unfinished group); a prefill holds one per group it writes, for one step. Slots are
found by group id (a token row index // ``group``) through ``lookup``, a tensor, so a read sorts its rows into
windowed and quantized ones without a Python loop.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class GroupWindow:
    """Model-dtype K/V of the unfinished key groups: ``keys``/``values`` are ``[slots, layers, group, H, D]``."""

    def __init__(
        self,
        layers: int,
        group: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_groups: int,
        reserve: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = (layers, group, heads, head_dim)
        self.group, self.dtype, self.reserve, self.device = group, dtype, reserve, device
        self.keys = torch.zeros(reserve, *self.shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.lookup = torch.full(
            (num_groups,), -1, dtype=torch.long, device=device
        )  # group id -> slot, -1: quantized (or unused)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = list(range(reserve - 1, -1, -1))
        self._pending_free: list[int] = []
        self._warned = False

    @property
    def slot_bytes(self) -> int:
        return 2 * torch.Size(self.shape).numel() * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.shape[0] * self.slot_bytes

    def extend(self, slots: int) -> None:
        """Add ``slots`` slots (what the KV budget reserves for the window)."""
        old = self.keys.shape[0]
        fresh = torch.zeros(slots, *self.shape, dtype=self.dtype, device=self.device)
        self.keys = torch.cat([self.keys, fresh])
        self.values = torch.cat([self.values, torch.zeros_like(fresh)])
        self.free.extend(range(old + slots - 1, old - 1, -1))

    def _grow(self) -> None:
        old = self.keys.shape[0]
        self.extend(max(1, old))
        if not self._warned:
            self._warned = True
            logger.warning(
                "hf_vram KV window: more than %d key groups are being written at once; the window grew to %d slots "
                "(%.1f MiB, beyond the KV budget's reserve). Set ContinuousBatchingConfig.max_requests_per_batch "
                "to the requests you run at once so the budget reserves their window.",
                old,
                self.keys.shape[0],
                self.nbytes / 2**20,
            )

    def take(self, group_ids: list[int]) -> None:
        """Give every group in ``group_ids`` a slot (a group keeps its slot while it is written)."""
        for gid in group_ids:
            if gid in self.slot_of:
                continue
            if not self.free:
                self._grow()
            slot = self.free.pop()
            self.slot_of[gid] = slot
            self.lookup[gid] = slot

    def seal(self, group_ids: list[int]) -> torch.Tensor:
        """The slots of groups just filled (returned so their tokens can be quantized). From now on reads find the
        groups quantized; the slots are reused after ``end_step``."""
        slots = [self.slot_of.pop(gid) for gid in group_ids]
        if group_ids:
            self.lookup[torch.tensor(group_ids, device=self.device)] = -1
        self._pending_free.extend(slots)
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def end_step(self) -> None:
        self.free.extend(self._pending_free)
        self._pending_free.clear()

    def drop(self, group_ids: list[int]) -> None:
        """Forget groups whose blocks went back to the pool unfinished (a request ended mid-group)."""
        gone = [gid for gid in group_ids if gid in self.slot_of]
        for gid in gone:
            self.free.append(self.slot_of.pop(gid))
        if gone:
            self.lookup[torch.tensor(gone, device=self.device)] = -1

    def copy(self, source_groups: list[int], dest_groups: list[int]) -> None:
        """A fork: the destination groups get slots holding what the source groups' slots hold."""
        pairs = [(s, d) for s, d in zip(source_groups, dest_groups, strict=True) if s in self.slot_of]
        self.take([d for _, d in pairs])
        for s, d in pairs:
            self.keys[self.slot_of[d]] = self.keys[self.slot_of[s]]
            self.values[self.slot_of[d]] = self.values[self.slot_of[s]]

    def clear(self) -> None:
        self.lookup.fill_(-1)
        self.slot_of.clear()
        self._pending_free.clear()
        self.free = list(range(self.keys.shape[0] - 1, -1, -1))
