"""Decode attention over int8 K/V page rows: the one-token sequences of a continuous-batching step, read by index.

``paged_decode_int8`` runs hf_vram's CPU kernel (``csrc/paged_decode.cpp``, built by ``cpu_extension``) when it is
loaded, else ``paged_decode_int8_reference``: the same math in torch ops (gather, dequantize, one float32 attention
per sequence), which is also what the tests hold the kernel to. Rows are ``KVCodec`` int8 rows (``H * D`` codes,
then ``H`` float16 scales); a sequence's keys are ``read_index[start : start + length]``, the last of them its own
new token, which is taken as computed (``fresh_keys`` / ``fresh_values``) as the other attention paths take it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_vram.kernels import cpu_extension


def kernel_available() -> bool:
    return cpu_extension.load()


def _decode_rows(rows: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    codes = rows[:, : heads * head_dim].view(torch.int8).reshape(-1, heads, head_dim).float()
    scales = rows[:, heads * head_dim : heads * (head_dim + 2)].contiguous().view(torch.float16).float()
    return codes * scales[:, :, None]


def paged_decode_int8_reference(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    read_index: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    fresh_keys: torch.Tensor,
    fresh_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``query`` ``[S, H, G, D]`` -> ``[S, H, G, D]`` float32, one float32 attention per sequence."""
    s_count, heads, _, head_dim = query.shape
    out = torch.empty(query.shape, dtype=torch.float32)
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        index = read_index[start : start + length - 1]
        kv = []
        for rows, fresh in ((key_rows, fresh_keys), (value_rows, fresh_values)):
            past = _decode_rows(rows.index_select(0, index), heads, head_dim)
            kv.append(torch.cat([past, fresh[s : s + 1].float()]).transpose(0, 1))  # [H, length, D]
        out[s] = F.scaled_dot_product_attention(query[s].float(), kv[0], kv[1], scale=scale)
    return out


def paged_decode_int8(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    read_index: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    fresh_keys: torch.Tensor,
    fresh_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The kernel where it is loaded (inputs made float32 / int64 and contiguous here), else the reference."""
    if not kernel_available():
        return paged_decode_int8_reference(
            query, key_rows, value_rows, read_index, starts, lengths, fresh_keys, fresh_values, scale
        )
    f32 = [x.float().contiguous() for x in (query, fresh_keys, fresh_values)]
    idx = [x.long().contiguous() for x in (read_index, starts, lengths)]
    return torch.ops.hf_vram_cpu.paged_decode_int8(f32[0], key_rows, value_rows, *idx, f32[1], f32[2], float(scale))


def paged_decode_kivi(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    read_index: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    window: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    fresh_keys: torch.Tensor,
    fresh_values: torch.Tensor,
    scale: float,
    bits: int,
    group: int,
    code_bytes: int,
    key_meta_bytes: int,
    value_group: int,
    rotary_pairs: int,
) -> torch.Tensor:
    """Decode attention over 4- or 2-bit KIVI rows (``hf_vram.kvcache.kivi``) and the int8 rows of the requests'
    windows (``window_keys`` / ``window_values``: byte offsets in ``window``, -1 where the pages answer), keys
    turned forward by their ``positions`` (``cos`` / ``sin`` ``[positions, head_dim]``, RopeFrame's layout; empty:
    keys were quantized as they are). Kernel only: callers check ``kernel_available`` first (the torch path is the
    allocator's own read)."""
    if not kernel_available():
        raise RuntimeError("hf_vram: paged_decode_kivi needs hf_vram's CPU kernel, which is not loaded (see its warning).")
    f32 = [x.float().contiguous() for x in (query, cos, sin, fresh_keys, fresh_values)]
    idx = [x.long().contiguous() for x in (read_index, positions, starts, lengths)]
    windows = [x.long().contiguous() for x in (window_keys, window_values)]
    return torch.ops.hf_vram_cpu.paged_decode_kivi(
        f32[0], key_rows, value_rows, *idx, window, *windows, f32[1], f32[2], f32[3], f32[4], float(scale),
        bits, group, code_bytes, key_meta_bytes, value_group, rotary_pairs,
    )  # fmt: skip
