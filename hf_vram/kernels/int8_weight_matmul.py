"""hf_vram's int8 weight-only matmul for the rows of a decoding step (``csrc/int8_matmul.cpp``).

torch's packed kernel (``torch._weight_int8pack_mm``) costs in proportion to the rows of x: a continuous-batching
step with 16 decoding sequences is 16 matrix-vector products over every weight. This kernel widens each tile of
int8 output channels to bfloat16 once and multiplies it into every row with AVX512-BF16's pairwise dot, so a step
pays for the weight about once. ``benchmarks/kernel_speed.py`` on the AVX-512 AMD EPYC (2 threads, SmolLM2's seven
projections of a layer): 151 against torch's 239 us at 1 row, 195 / 369 at 4, 950 / 1826 at 32, 3243 / 7951 at 128
(where dequantizing into a bfloat16 matmul takes 4131; past ``MAX_ROWS`` that path wins), and the 49152-row tied
head at one row 1164 against 2535 us. The dispatch takes it where those loops run (an AVX-512 build of the kernels
on a CPU with AVX512-BF16) and the rows would compute in bfloat16 anyway. On torch's AVX2 path the op runs its
float32 loops (tiles of 3 channels x 4 rows, so accumulators, channels and a row fit AVX2's 16 registers; a
channel tile is widened to float32 once per call when more than one tile of rows meets it). On the AVX2 AMD EPYC
(``benchmarks/kernel_speed.py --crossover-only``, 2026-12-03, the "int8 hf_vram" column) they beat torch's packed
kernel and dequantizing into a float32 matmul at every row count up to 128: SmolLM2's seven projections of a layer
292 against 312 us at 1 row, 1667 / 2089 at 16, 3801 against 6549 (packed) and 7603 (dequantized) at 64, 8960 /
10227 (dequantized) at 128, a tie at 256. bfloat16 rows widen exactly to float32, so there they also stand in for
the float32 matmul the dispatch would dequantize them into. The plain x86-64 build (torch's DEFAULT path) is not
taken. A row's result does not depend on the rows beside it (one fixed order of accumulation whatever M is).
"""

from __future__ import annotations

import functools

import torch

from hf_vram.kernels import cpu_extension
from hf_vram.kernels.cpu_caps import cpu_flags, torch_capability

# The most rows the BF16-dot loops take: past about 128 (SmolLM2's projections) dequantizing the weight into one
# bfloat16 matmul wins.
MAX_ROWS = 128
DOT_ALIGN = 32  # input features per BF16-dot step: other sizes take the float32 loops
# The most rows the float32 loops take on torch's AVX2 path (measured above; more rows dequantize).
FLOAT_LOOPS_MAX_ROWS = 128


@functools.cache
def bf16_dot_available() -> bool:
    """Whether bfloat16 activations take the BF16-dot loops here. Asked of the built kernel, and only where torch
    runs its AVX-512 path on a CPU with AVX512-BF16 (so no other build of the kernels is made just to ask)."""
    if torch_capability() != "avx512" or "avx512_bf16" not in cpu_flags():
        return False
    return cpu_extension.load() and bool(torch.ops.hf_vram_cpu.int8_weight_matmul_bf16_dot())


@functools.cache
def max_rows() -> int:
    """The most rows of bfloat16 activations the dispatch sends here on this process's CPU path: the BF16-dot
    loops' ``MAX_ROWS``; on the AVX2 path the float32 loops' ``FLOAT_LOOPS_MAX_ROWS`` (where the kernels build);
    elsewhere none (torch's packed kernel, which these loops were not measured against there)."""
    if bf16_dot_available():
        return MAX_ROWS
    if torch_capability() == "avx2" and cpu_extension.load():
        return FLOAT_LOOPS_MAX_ROWS
    return 0


def takes(x: torch.Tensor, act_dtype: torch.dtype) -> bool:
    """Whether ``x [M, K]`` whose path would compute in ``act_dtype`` goes to this kernel: few enough rows, eager
    (a compiled graph keeps torch's packed kernel, which inductor lowers), on a CPU path where the kernel was
    measured to win. BF16-dot loops: a bfloat16 computation in whole dot steps. Float32 loops: a bfloat16 one, or a
    float32 one of bfloat16 rows (which widen exactly, as they would for that matmul); float32 rows of a float32
    computation are never rounded to bfloat16 for it."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or x.shape[0] > max_rows():
        return False
    if bf16_dot_available():
        return act_dtype == torch.bfloat16 and x.shape[1] % DOT_ALIGN == 0
    return act_dtype == torch.bfloat16 or (act_dtype == torch.float32 and x.dtype == torch.bfloat16)


def int8_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ qweight.T) * scales`` in x's dtype (bfloat16, float16 or float32), every operand contiguous; int8
    ``qweight [N, K]``, ``scales [N]`` in x's dtype. Kernel only: the dispatch asks ``takes`` first."""
    if not cpu_extension.load():
        raise RuntimeError("hf_vram: int8_weight_matmul needs hf_vram's CPU kernels, which are not loaded (see the warning).")
    return torch.ops.hf_vram_cpu.int8_weight_matmul(x.contiguous(), qweight.contiguous(), scales.to(x.dtype).contiguous())


def int8_weight_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same product in float64, rounded once to x's dtype (what the tests hold the kernel to)."""
    return ((x.double() @ qweight.double().T) * scales.double()).to(x.dtype)
