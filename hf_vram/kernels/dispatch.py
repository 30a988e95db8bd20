"""Pick a matmul kernel for a quantized layer by device, CPU kernel path and number of rows.

CPU: up to ``packed_max_rows`` rows (decode) use torch's packed int8/int4 kernels with bfloat16 activations;
larger int8 batches (prefill) dequantize ``DEQUANT_TILE_ROWS`` output rows at a time into the activation dtype and
use a plain matmul, which beats the packed kernels there, and never materialises more than one tile of float
weight; from ``int4_dequant_min_rows`` rows int4 unpacks its weight once and runs one float matmul. Where the
crossovers lie depends on torch's CPU path (AVX2 or AVX-512, ``cpu_caps``): ``CPU_THRESHOLDS`` holds them per
path, measured by ``benchmarks/kernels.py``. CUDA: the Triton kernels. Other devices: tile-wise dequantization.
Every kernel reached from here checks its inputs first (``preconditions``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_vram.kernels import cpu
from hf_vram.kernels.cpu_caps import torch_capability
from hf_vram.kernels.packing import unpack_int4
from hf_vram.kernels.preconditions import int8_packed_supported
from hf_vram.kernels.reference import int4_matmul_reference, w8a8_matmul_reference

DEQUANT_TILE_ROWS = 8192


@dataclass(frozen=True)
class CpuThresholds:
    """Row counts where the CPU dispatch switches kernels, for one torch CPU path."""

    packed_max_rows: int  # int8: rows up to this run torch's packed kernel, more dequantize tile-wise
    int4_dequant_min_rows: int  # int4: from this many rows, unpack once and run one float matmul
    measured: str  # where the numbers come from


# Crossovers of the packed kernels against dequantize + float32 matmul on SmolLM2's projection shapes
# (benchmarks/kernels.py, "dispatch crossover" table in BENCHMARKS.md). AVX-512 was not measured yet: it keeps the
# AVX2 numbers until a run on such a machine replaces them.
CPU_THRESHOLDS: dict[str, CpuThresholds] = {
    "avx2": CpuThresholds(16, 512, "AMD EPYC (AVX2), benchmarks/kernels.py"),
    "default": CpuThresholds(16, 512, "AMD EPYC with ATEN_CPU_CAPABILITY=default, benchmarks/kernels.py"),
    "avx512": CpuThresholds(16, 512, "not measured on AVX-512 yet: the AVX2 values"),
}


@functools.cache
def cpu_thresholds() -> CpuThresholds:
    """The thresholds of the path this process's torch takes (fixed for the life of the process)."""
    return CPU_THRESHOLDS.get(torch_capability(), CPU_THRESHOLDS["avx2"])


def _act_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.bfloat16 if x.dtype == torch.float32 else x.dtype


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [M, K]`` through an int8 per-channel weight ``[N, K]``; result in ``x.dtype``."""
    if x.device.type == "cuda":
        from hf_vram.kernels.triton_matmul import int8_matmul_triton

        xc = x.to(compute_dtype) if compute_dtype is not None else x
        return int8_matmul_triton(xc, qweight, scales, bias).to(x.dtype)
    if x.device.type == "cpu" and x.shape[0] <= cpu_thresholds().packed_max_rows and int8_packed_supported(x.shape[1]):
        y = cpu.int8_packed_matmul(x, qweight, scales, _act_dtype(x, compute_dtype))
        return y + bias.to(y.dtype) if bias is not None else y
    dtype = compute_dtype or x.dtype
    xc = x.to(dtype)
    tiles = []
    for n0 in range(0, qweight.shape[0], DEQUANT_TILE_ROWS):
        q = qweight[n0 : n0 + DEQUANT_TILE_ROWS]
        w = q.to(dtype) * scales[n0 : n0 + DEQUANT_TILE_ROWS].to(dtype)[:, None]
        tiles.append(F.linear(xc, w))
    y = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    layout: str,
    scales_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [M, K_padded]`` (already zero-padded) through an int4 weight held in ``layout``."""
    if layout == cpu.CPU_INT4_LAYOUT and x.shape[0] >= cpu_thresholds().int4_dequant_min_rows:
        dtype = compute_dtype or x.dtype
        y = F.linear(x.to(dtype), cpu.int4_dequantize_cpu_layout(qweight, scales_zeros, dtype)).to(x.dtype)
    elif layout == cpu.CPU_INT4_LAYOUT:
        y = cpu.int4_packed_matmul(x, qweight, scales_zeros, group_size, _act_dtype(x, compute_dtype))
    elif x.device.type == "cuda":
        from hf_vram.kernels.triton_matmul import int4_matmul_triton

        xc = x.to(compute_dtype) if compute_dtype is not None else x
        return int4_matmul_triton(xc, qweight, scales_zeros, group_size, bias).to(x.dtype)
    else:
        y = int4_matmul_reference(x, unpack_int4(qweight), scales_zeros, group_size)
    return y + bias.to(y.dtype) if bias is not None else y


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor | None,
    packed,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token dynamic int8 activations times int8 weights: FBGEMM on CPU (``packed``), Triton on CUDA."""
    if packed is not None:
        y = cpu.w8a8_matmul(x, packed)
    elif x.device.type == "cuda":
        from hf_vram.kernels.triton_matmul import w8a8_matmul_triton

        return w8a8_matmul_triton(x, qweight, scales, bias)
    else:
        y = w8a8_matmul_reference(x, qweight, scales)
    return y + bias.to(y.dtype) if bias is not None else y
