"""Quantized K/V rows: one token's keys (or values) for every KV head of one layer as a row of bytes.

A paged cache stores tokens as rows that it writes and reads by index (Transformers' continuous batching does:
``index_copy_`` in, ``index_select`` out). A ``KVCodec`` turns ``[tokens, heads, head_dim]`` floats into
``[tokens, row_bytes]`` uint8 rows and back, so such a cache holds quantized K/V with its own indexing unchanged,
and a read dequantizes exactly the tokens read, never a layer's whole history.

- 8 bits: symmetric per token and head, ``x = q * scale``, one float16 scale (``row_bytes = H * (D + 2)``: 0.52x of
  bfloat16 for head_dim 64).
- 4 and 2 bits: asymmetric per token and head, ``x = q * scale + low``, float16 scale and low
  (``H * (D * bits / 8 + 4)``: 0.28x / 0.16x of bfloat16 at head_dim 64). Keys are rotated first by an orthogonal
  matrix (a normalised Hadamard matrix when head_dim is a power of two): keys carry a few outlier channels, which
  per-token rounding of 4 or 2 bits would spend the whole range on (KIVI, arXiv 2402.02750, quantizes keys per
  channel for that reason); the rotation spreads each outlier over every channel, and since it is orthogonal the
  read undoes it exactly (``K = K_rot R^T``), so attention sees the keys, not the rotated ones.
"""

from __future__ import annotations

import math

import torch

BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16


def rotation(head_dim: int) -> torch.Tensor:
    """An orthogonal ``[head_dim, head_dim]`` float32 matrix: normalised Hadamard (Sylvester) for powers of two,
    else a fixed seeded random orthogonal matrix."""
    if head_dim & (head_dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(head_dim)
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(0)))
    return q * torch.sign(torch.diagonal(r))[None, :]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D]`` integer codes in ``0..2**bits-1`` -> ``[..., D * bits / 8]`` uint8 (little end first)."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[..., n]`` uint8 -> ``[..., n * 8 / bits]`` uint8 codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


class KVCodec:
    """Encode ``[T, H, D]`` K or V states into ``[T, row_bytes]`` uint8 rows and decode them back."""

    def __init__(self, bits: int, num_heads: int, head_dim: int, *, rotate: bool = False) -> None:
        if bits not in BITS:
            raise ValueError(f"hf_vram KV codec: bits={bits!r} is invalid; allowed: {', '.join(map(str, BITS))}.")
        if (head_dim * bits) % 8:
            raise ValueError(f"hf_vram KV codec: head_dim {head_dim} at {bits} bits is not a whole number of bytes.")
        self.bits, self.num_heads, self.head_dim = bits, num_heads, head_dim
        self.code_bytes = num_heads * head_dim * bits // 8
        self.meta_bytes = num_heads * SCALE_DTYPE.itemsize * (1 if bits == 8 else 2)
        self.row_bytes = self.code_bytes + self.meta_bytes
        self._rotation = rotation(head_dim) if rotate and bits < 8 else None
        self._rotation_on: dict[tuple, torch.Tensor] = {}

    def _rot(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._rotation_on:
            self._rotation_on[key] = self._rotation.to(device=like.device, dtype=like.dtype)
        return self._rotation_on[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` float -> ``[T, row_bytes]`` uint8."""
        t = x.shape[0]
        xf = x.float()
        if self._rotation is not None:
            xf = xf @ self._rot(xf)
        if self.bits == 8:
            scale = (xf.abs().amax(-1) / 127.0).to(SCALE_DTYPE)
            s = scale.float().clamp_min(1e-8)[..., None]
            codes = torch.round(xf / s).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
            meta = [scale]
        else:
            levels = (1 << self.bits) - 1
            low = xf.amin(-1).to(SCALE_DTYPE)
            lo = low.float()[..., None]
            scale = ((xf.amax(-1, keepdim=True) - lo) / levels).squeeze(-1).to(SCALE_DTYPE)
            s = scale.float().clamp_min(1e-8)[..., None]
            codes = pack(torch.round((xf - lo) / s).clamp_(0, levels), self.bits)
            meta = [scale, low]
        per_head = self.num_heads * SCALE_DTYPE.itemsize
        parts = [codes.reshape(t, self.code_bytes)] + [m.contiguous().view(torch.uint8).reshape(t, per_head) for m in meta]
        return torch.cat(parts, dim=1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[T, row_bytes]`` uint8 -> ``[T, H, D]`` in ``dtype``. Reads are the hot path (every step reads every
        cached token of the batch), so the codes and scales are read through views of the rows, not copies, and
        converted straight to ``dtype`` in two passes."""
        t, h, d = rows.shape[0], self.num_heads, self.head_dim
        meta = rows[:, self.code_bytes :].view(SCALE_DTYPE).to(dtype)  # [T, H] scales (then H lows)
        scale = meta[:, :h, None]
        if self.bits == 8:
            x = rows[:, : self.code_bytes].view(torch.int8).reshape(t, h, d).to(dtype)
            x.mul_(scale)
        else:
            q = unpack(rows[:, : self.code_bytes].reshape(t, h, d * self.bits // 8), self.bits).to(dtype)
            x = torch.addcmul(meta[:, h:, None], q, scale)
        if self._rotation is not None:
            x = x @ self._rot(x).t()
        return x

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """What a read returns for what was written (``[T, H, D]``)."""
        return self.decode(self.encode(x), x.dtype)
