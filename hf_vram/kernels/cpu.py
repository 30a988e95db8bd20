"""torch's packed CPU kernels for int8 and int4 weights, and the int4 layout they need.

``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu`` are 2-4x faster than a bfloat16 matmul
for matrix-vector products on SmolLM2's shapes, but only with bfloat16/float16 activations (with float32 ones
they are 5-10x slower than a float32 matmul), and both lose to a float32 matmul for large batches on CPUs
without AVX-512: ``hf_vram.kernels.dispatch`` chooses by the number of rows.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from hf_vram.kernels.preconditions import (
    check_activations,
    check_compute_dtype,
    check_cpu_int4_shape,
    check_int4_weight,
    check_int8_packed_shape,
    check_int8_weight,
    kernel_ready,
)

# torch's int4 CPU kernel keeps its weight in a blocked layout of its own (nibbles permuted within the matrix).
CPU_INT4_LAYOUT = "cpu_int4pack"


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def int8_packed_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype, *, weights_ready: bool = False
) -> torch.Tensor:
    """``x [M, K]`` times int8 ``[N, K]`` with per-row scales, computed in ``act_dtype``, returned in x's dtype.

    Every operand reaches torch contiguous and 64-byte aligned (``preconditions``): a misaligned weight crashes
    this kernel on the AVX-512 path (a pointer check per call). ``weights_ready``: the caller (a layer's
    ``prepare_for_device``) already checked the weight's dtype and shape, which are then not checked again.
    """
    check_activations(x, qweight.shape[1], "int8_packed_matmul")
    check_compute_dtype(act_dtype, "int8_packed_matmul")
    if not weights_ready:
        check_int8_weight(qweight, scales, "int8_packed_matmul")
        check_int8_packed_shape(qweight.shape[1], "int8_packed_matmul")
    scales = kernel_ready(_as(scales, act_dtype))
    out = torch._weight_int8pack_mm(kernel_ready(_as(x, act_dtype)), kernel_ready(qweight), scales)
    return _as(out, x.dtype)


def cpu_int4_supported(out_features: int, in_features: int) -> bool:
    """torch's int4 CPU kernel needs out_features divisible by 16 (and an even input size)."""
    return out_features % 16 == 0 and in_features % 2 == 0


def int4_to_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` (any integer dtype) to the CPU kernel's packed layout (uint8 ``[N, K/2]``)."""
    check_cpu_int4_shape(codes.shape[0], codes.shape[1], "int4_to_cpu_layout")
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def int4_from_cpu_layout(packed_cpu: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 uint8 ``[N, K]`` back from the CPU kernel's layout (a cached gather per shape)."""
    n, half = packed_cpu.shape
    codes = torch.empty(n * half * 2, dtype=torch.uint8)
    codes[_cpu_layout_sources(n, half * 2)] = _nibbles(packed_cpu)
    return codes.view(n, half * 2)


def int4_dequantize_cpu_layout(packed_cpu: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``[N, K_padded]`` of a CPU-layout int4 matrix: ``(code - 8) * scale + zero`` per group."""
    codes = int4_from_cpu_layout(packed_cpu)
    n_groups, n, _ = scales_zeros.shape
    sz = scales_zeros.to(dtype).transpose(0, 1)  # [N, groups, 2]
    w = (codes.view(n, n_groups, -1).to(dtype) - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(n, -1)


@functools.lru_cache(maxsize=64)
def _cpu_layout_sources(n: int, k: int) -> torch.Tensor:
    """Where each nibble of the CPU layout came from in the ``[n, k]`` code matrix.

    The layout is a fixed permutation of nibble positions that depends only on the shape, so it is found by
    converting the positions themselves, one hex digit at a time. Cached: training's backward and saving reuse it.
    """
    total = n * k
    index = torch.arange(total, dtype=torch.int64)
    source = torch.zeros(total, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(total, 16)))):
        probe = ((index >> (4 * digit)) & 0xF).view(n, k)
        landed = _nibbles(int4_to_cpu_layout(probe)).to(torch.int64)
        source |= landed << (4 * digit)
    return source


def int4_packed_matmul(
    x: torch.Tensor,
    packed_cpu: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    act_dtype: torch.dtype,
    *,
    weights_ready: bool = False,
) -> torch.Tensor:
    """``x [M, K_padded]`` times a CPU-layout int4 weight, computed in ``act_dtype``, returned in x's dtype.

    ``weights_ready``: as for ``int8_packed_matmul`` (the layer converted and checked its weight once)."""
    k = packed_cpu.shape[1] * 2
    check_activations(x, k, "int4_packed_matmul")
    check_compute_dtype(act_dtype, "int4_packed_matmul")
    if not weights_ready:
        check_int4_weight(packed_cpu, scales_zeros, group_size, k, "int4_packed_matmul")
        check_cpu_int4_shape(packed_cpu.shape[0], k, "int4_packed_matmul")
    scales_zeros = kernel_ready(_as(scales_zeros, act_dtype))
    out = torch._weight_int4pack_mm_for_cpu(kernel_ready(_as(x, act_dtype)), kernel_ready(packed_cpu), group_size, scales_zeros)
    return _as(out, x.dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)


# --- W8A8 through FBGEMM ----------------------------------------------------------------------------------------
# FBGEMM's dynamic int8 linear quantizes its input with one scale per tensor. Dividing each row by its own
# absolute maximum first puts every row in [-1, 1], so that one scale is in effect a per-token scale; the rows
# are multiplied back afterwards. reduce_range=True (7-bit activation codes) is required on AVX2: with all 8 bits
# the u8 x s8 pair sums saturate int16 (measured on a tiny Llama: 9.7% logit error against 1.5% with 7 bits and
# 0.9% for the exact int32 W8A8 result, which the CUDA kernel computes).
FBGEMM_LAYOUT = "fbgemm"


def w8a8_pack(qweight: torch.Tensor, scales: torch.Tensor):
    """An FBGEMM packed weight (opaque; holds the int8 codes) from int8 ``[N, K]`` and per-row scales."""
    check_int8_weight(qweight, scales, "w8a8_pack")
    qweight = kernel_ready(qweight)
    zeros = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch flags quantized dtypes as deprecated; FBGEMM's op still takes them
        warnings.simplefilter("ignore", UserWarning)
        wq = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(wq, None)


def w8a8_unpack(packed) -> torch.Tensor:
    """The int8 codes back from an FBGEMM packed weight, exactly."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def w8a8_packed_bytes(packed) -> int:
    """FBGEMM keeps one int8 byte per weight (plus per-column offsets, counted as 4 bytes per output)."""
    q = torch.ops.quantized.linear_unpack(packed)[0]
    return q.numel() + 4 * q.shape[0]


def w8a8_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """Per-token int8 activations times an FBGEMM packed weight; float32 math, returned in x's dtype."""
    check_activations(x, None, "w8a8_matmul")
    xf = kernel_ready(x.float())
    row_scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    y = torch.ops.quantized.linear_dynamic(xf / row_scale, packed, True) * row_scale
    return y.to(x.dtype)
