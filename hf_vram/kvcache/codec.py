"""Quantized K/V rows: one token's keys (or values) for every KV head of one layer as a row of bytes.

A paged cache stores tokens as rows that it writes and reads by index (Transformers' continuous batching does:
``index_copy_`` in, ``index_select`` out). ``KVCodec`` turns ``[tokens, heads, head_dim]`` floats into
``[tokens, row_bytes]`` uint8 rows and back, so such a cache holds quantized K/V with its own indexing unchanged,
and a read dequantizes exactly the tokens read, never a layer's whole history: 8 bits, symmetric per token and head,
``x = q * scale``, one float16 scale (``row_bytes = H * (D + 2)``: 0.52x of bfloat16 for head_dim 64). 4 and 2 bits
need groups across tokens for the keys (``hf_vram.kvcache.kivi``); ``pack``/``unpack_to`` serve them.
"""

from __future__ import annotations

import torch

BITS = (8,)
SCALE_DTYPE = torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D]`` integer codes in ``0..2**bits-1`` -> ``[..., D * bits / 8]`` uint8 (little end first)."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack_to(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack``, straight into ``dtype``: ``[..., n]`` uint8 -> ``[..., n * 8 / bits]`` codes, each
    written once and converted on the way (on CPU about 3x faster than unpacking to uint8 and converting after, and
    reads unpack every cached token each step)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    out = torch.empty(*packed.shape, per_byte, dtype=dtype, device=packed.device)
    for i in range(per_byte):
        part = packed >> (bits * i) if i else packed
        out[..., i] = part if i == per_byte - 1 else part & mask
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


class KVCodec:
    """Encode ``[T, H, D]`` K or V states into ``[T, row_bytes]`` uint8 rows (int8 codes, a float16 scale per token
    and head) and decode them back."""

    def __init__(self, bits: int, num_heads: int, head_dim: int) -> None:
        if bits not in BITS:
            raise ValueError(f"hf_vram KV codec: bits={bits!r} is invalid; allowed: 8 (4 and 2 bits: hf_vram.kvcache.kivi).")
        self.bits, self.num_heads, self.head_dim = bits, num_heads, head_dim
        self.code_bytes = num_heads * head_dim
        self.meta_bytes = num_heads * SCALE_DTYPE.itemsize
        self.row_bytes = self.code_bytes + self.meta_bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` float -> ``[T, row_bytes]`` uint8."""
        t = x.shape[0]
        xf = x.float()
        scale = (xf.abs().amax(-1) / 127.0).to(SCALE_DTYPE)
        codes = torch.round(xf / scale.float().clamp_min(1e-8)[..., None]).clamp_(-127, 127).to(torch.int8)
        meta = scale.contiguous().view(torch.uint8).reshape(t, self.meta_bytes)
        return torch.cat([codes.view(torch.uint8).reshape(t, self.code_bytes), meta], dim=1)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[T, row_bytes]`` uint8 -> ``[T, H, D]`` in ``dtype``. Reads are the hot path (every step reads every
        cached token of the batch), so the codes and scales are read through views of the rows, not copies, and
        converted straight to ``dtype`` in one pass (the product of int8 codes and ``dtype`` scales)."""
        t, h, d = rows.shape[0], self.num_heads, self.head_dim
        scale = rows[:, self.code_bytes :].view(SCALE_DTYPE).to(dtype)[:, :, None]
        return torch.mul(rows[:, : self.code_bytes].view(torch.int8).reshape(t, h, d), scale)  # int8 * dtype: dtype

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """What a read returns for what was written (``[T, H, D]``)."""
        return self.decode(self.encode(x), x.dtype)
