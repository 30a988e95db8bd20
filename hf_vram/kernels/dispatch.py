"""Pick a matmul kernel for a quantized layer by device, CPU kernel path and number of rows.

CPU: up to ``packed_max_rows`` rows (decode) use torch's packed int8/int4 kernels with bfloat16 activations
(int8 on torch's AVX2 path and on a CPU with AVX512-BF16: hf_vram's own kernel, ``int8_weight_matmul``, up to its
``max_rows()``);
larger int8 batches (prefill) dequantize ``DEQUANT_TILE_ROWS`` output rows at a time and use a plain matmul, which
beats the packed kernels there, and never materialises more than one tile of float weight; from
``int4_dequant_min_rows`` rows int4 unpacks its weight once and runs one float matmul. Those float matmuls run in
the activation dtype where the CPU multiplies it natively, else in float32 (``dequant_dtype``: a bfloat16 matmul on
the AVX2 EPYC is 4.5-8x slower than float32, and the crossovers were measured against float32). Where the
crossovers lie depends on torch's CPU path (AVX2 or AVX-512, ``cpu_caps``): ``CPU_THRESHOLDS`` holds them per
path, measured by ``benchmarks/kernel_speed.py``. CUDA: the Triton kernels. Other devices: tile-wise dequantization.
Every kernel reached from here checks its inputs first (``preconditions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_vram.kernels import cpu, int8_weight_matmul
from hf_vram.kernels.cpu_caps import native_half_matmul, torch_capability
from hf_vram.kernels.packing import unpack_int4
from hf_vram.kernels.preconditions import int8_packed_supported, kernel_ready
from hf_vram.kernels.reference import int4_matmul_reference, w8a8_matmul_reference

DEQUANT_TILE_ROWS = 8192


@dataclass(frozen=True)
class CpuThresholds:
    """Row counts where the CPU dispatch switches kernels, for one torch CPU path."""

    packed_max_rows: int  # int8: rows up to this run torch's packed kernel, more dequantize tile-wise
    int4_dequant_min_rows: int  # int4: from this many rows, unpack once and run one float matmul
    measured: str  # where the numbers come from


# Crossovers of the packed kernels against dequantize + float32 matmul, over the seven projection shapes of one
# SmolLM2 layer (benchmarks/kernel_speed.py; the "dispatch crossover" tables in BENCHMARKS.md). On the DEFAULT path (no
# vector kernels) torch's packed kernels are 5-10x slower than on AVX2 and lose from two rows on. On the AVX-512 Xeon
# the int8 crossover is the same (32 rows), and int4's packed kernel holds on to 256 rows (dequantizing wins at 512).
CPU_THRESHOLDS: dict[str, CpuThresholds] = {
    "avx2": CpuThresholds(32, 256, "AMD EPYC, AVX2 path, benchmarks/kernel_speed.py 2026-11-30"),
    "default": CpuThresholds(1, 4, "AMD EPYC with ATEN_CPU_CAPABILITY=default, benchmarks/kernel_speed.py 2026-11-30"),
    "avx512": CpuThresholds(32, 512, "Intel Xeon (AVX-512, AMX), AVX512 path, benchmarks/kernel_speed.py 2026-12-02"),
}


# The path a process takes is fixed when torch starts: read once (a compiled graph cannot call into torch.backends).
_THIS_PATH = CPU_THRESHOLDS.get(torch_capability(), CPU_THRESHOLDS["avx2"])


def cpu_thresholds() -> CpuThresholds:
    """The thresholds of the path this process's torch takes."""
    return _THIS_PATH


# Reduced-precision activation dtypes this CPU multiplies natively (read once, like the path).
NATIVE_HALF = frozenset(d for d in (torch.bfloat16, torch.float16) if native_half_matmul(d))


def dequant_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a dequantizing path's float matmul: the layer's compute dtype when it names one; else the
    activations' own, unless they are bfloat16/float16 on a CPU without native kernels for them: float32 there."""
    if compute_dtype is not None:
        return compute_dtype
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dtype not in NATIVE_HALF:
        return torch.float32
    return x.dtype


def _act_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.bfloat16 if x.dtype == torch.float32 else x.dtype


def _int8_packed_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.shape[0] <= cpu_thresholds().packed_max_rows and int8_packed_supported(x.shape[1])


def _int8_dot_path(x: torch.Tensor, compute_dtype: torch.dtype | None) -> bool:
    """hf_vram's int8 kernel (``int8_weight_matmul``) where the path these rows would take computes in a dtype the
    kernel keeps (``takes``): float32 activations of a prefill-sized batch, which dequantize into a float32 matmul,
    stay there."""
    act = _act_dtype(x, compute_dtype) if _int8_packed_path(x) else dequant_dtype(x, compute_dtype)
    return int8_weight_matmul.takes(x, act)


def _int4_dequant_path(x: torch.Tensor, layout: str) -> bool:
    return layout == cpu.CPU_INT4_LAYOUT and x.shape[0] >= cpu_thresholds().int4_dequant_min_rows


def int8_traceable(x: torch.Tensor, kernel_scales: torch.Tensor | None, compute_dtype: torch.dtype | None) -> bool:
    """Whether ``torch.compile`` may trace ``int8_linear`` itself (plain aten calls, inductor keeps the packed kernel
    as an extern call) rather than call it as an opaque custom op. Inductor's lowering of the packed kernel fails
    on a scale tensor computed inside the graph, so the scales must already be in the activation dtype."""
    if x.device.type != "cpu":
        return False
    if not _int8_packed_path(x):
        return True
    return kernel_scales is not None and kernel_scales.dtype == _act_dtype(x, compute_dtype)


def int4_traceable(x: torch.Tensor, layout: str, scales_zeros: torch.Tensor, compute_dtype: torch.dtype | None) -> bool:
    """Like ``int8_traceable``: only the packed CPU kernel with (scale, zero) pairs already in the activation dtype
    (the dequantizing path unpacks the CPU layout through a cached gather, opaque to tracing)."""
    return (
        layout == cpu.CPU_INT4_LAYOUT and not _int4_dequant_path(x, layout) and scales_zeros.dtype == _act_dtype(x, compute_dtype)
    )


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None = None,
    kernel_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K]`` through an int8 per-channel weight ``[N, K]``; result in ``x.dtype``.

    ``kernel_scales``: the same scales already in the packed kernel's activation dtype (layers keep such a copy, so
    no conversion runs per call); used when their dtype is the one this call computes in.
    """
    if x.device.type == "cuda":
        from hf_vram.kernels.triton_matmul import int8_matmul_triton

        xc = x.to(compute_dtype) if compute_dtype is not None else x
        return int8_matmul_triton(xc, qweight, scales, bias).to(x.dtype)
    if _int8_dot_path(x, compute_dtype):
        bf16_scales = kernel_scales if kernel_scales is not None and kernel_scales.dtype == torch.bfloat16 else scales
        y = int8_weight_matmul.int8_weight_matmul(kernel_ready(x.to(torch.bfloat16)), qweight, bf16_scales).to(x.dtype)
        return y + bias.to(y.dtype) if bias is not None else y
    if _int8_packed_path(x):
        act = _act_dtype(x, compute_dtype)
        ready = kernel_scales is not None and kernel_scales.dtype == act  # a prepared layer's weight and scales
        y = cpu.int8_packed_matmul(x, qweight, kernel_scales if ready else scales, act, weights_ready=ready)
        return y + bias.to(y.dtype) if bias is not None else y
    dtype = dequant_dtype(x, compute_dtype)
    y = int8_dequant_matmul(x.to(dtype), qweight, scales)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def int8_dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` in ``x.dtype``, ``DEQUANT_TILE_ROWS`` output channels at a time. The
    codes are exact in every float dtype and a channel's scale commutes with the product, so the scales multiply the
    ``[M, N]`` output in place rather than a scaled copy of the ``[N, K]`` weight being built, which in bfloat16 cost
    more than the matmul itself (SmolLM2's seven projections, AVX-512 EPYC: 6.5 -> 2.0 ms at 48 rows, 9.3 -> 5.6 ms
    at 272, where bfloat16 weights take 1.5 and 5.5). Always the output, whatever the rows, so a row's result does
    not depend on how many others share its matmul (a request prefilled alone or inside a continuous-batching step);
    scaling the weight in place instead past 576 rows would save 7% at 3072 rows."""
    tiles = [
        F.linear(x, qweight[n0 : n0 + DEQUANT_TILE_ROWS].to(x.dtype)).mul_(scales[n0 : n0 + DEQUANT_TILE_ROWS].to(x.dtype))
        for n0 in range(0, qweight.shape[0], DEQUANT_TILE_ROWS)
    ]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=-1)


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
    if _int4_dequant_path(x, layout):
        dtype = dequant_dtype(x, compute_dtype)
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
