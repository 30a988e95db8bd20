"""Two 4-bit codes per byte: the saved int4 layout, shared by the quantizer, Triton and the reference."""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes 0..15 ``[rows, 2k]`` into bytes ``[rows, k]``, element ``2i`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes 0..15 ``[rows, 2k]``."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
