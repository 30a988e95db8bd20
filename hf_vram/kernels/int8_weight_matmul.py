"""hf_vram's int8 weight-only matmul for the rows of a decoding step (``csrc/int8_matmul.cpp``).

torch's packed kernel (``torch._weight_int8pack_mm``) costs in proportion to the rows of x: a continuous-batching
step with 16 decoding sequences is 16 matrix-vector products over every weight. This kernel widens each tile of
int8 output channels to bfloat16 once and multiplies it into every row with AVX512-BF16's pairwise dot, so a step
pays for the weight about once. ``benchmarks/kernels.py`` on the AVX-512 AMD EPYC (2 threads, SmolLM2's seven
projections of a layer): 151 against torch's 239 us at 1 row, 195 / 369 at 4, 950 / 1826 at 32, 3243 / 7951 at 128
(where dequantizing into a bfloat16 matmul takes 4131; past ``MAX_ROWS`` that path wins), and the 49152-row tied
head at one row 1164 against 2535 us. The dispatch takes it where those loops run (an AVX-512 build of the kernels
on a CPU with AVX512-BF16) and the rows would compute in bfloat16 anyway. Elsewhere the op runs float32 loops, which
on that EPYC's AVX2 path beat torch's packed kernel up to 16 rows (197 against 313 us at one) but are not taken
until measured on an AVX2 CPU. A row's result does not depend on the rows beside it (one fixed order of
accumulation whatever M is).
"""

from __future__ import annotations

import functools

import torch

from hf_vram.kernels import cpu_extension
from hf_vram.kernels.cpu_caps import cpu_flags, torch_capability

# The most rows it takes: past about 128 (SmolLM2's projections) dequantizing the weight into one bfloat16 matmul wins.
MAX_ROWS = 128
DOT_ALIGN = 32  # input features per BF16-dot step: other sizes take the float32 loops


@functools.cache
def bf16_dot_available() -> bool:
    """Whether bfloat16 activations take the BF16-dot loops here. Asked of the built kernel, and only where torch
    runs its AVX-512 path on a CPU with AVX512-BF16 (so no other build of the kernels is made just to ask)."""
    if torch_capability() != "avx512" or "avx512_bf16" not in cpu_flags():
        return False
    return cpu_extension.load() and bool(torch.ops.hf_vram_cpu.int8_weight_matmul_bf16_dot())


def takes(x: torch.Tensor, act_dtype: torch.dtype) -> bool:
    """Whether ``x [M, K]`` computing in ``act_dtype`` goes to this kernel: bfloat16, few enough rows, whole
    BF16-dot steps, eager (a compiled graph keeps torch's packed kernel, which inductor lowers), on a CPU with the
    loops."""
    return (
        act_dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.shape[0] <= MAX_ROWS
        and x.shape[1] % DOT_ALIGN == 0
        and not torch.compiler.is_compiling()
        and bf16_dot_available()
    )


def int8_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ qweight.T) * scales`` in x's dtype (bfloat16, float16 or float32), every operand contiguous; int8
    ``qweight [N, K]``, ``scales [N]`` in x's dtype. Kernel only: the dispatch asks ``takes`` first."""
    if not cpu_extension.load():
        raise RuntimeError("hf_vram: int8_weight_matmul needs hf_vram's CPU kernels, which are not loaded (see the warning).")
    return torch.ops.hf_vram_cpu.int8_weight_matmul(x.contiguous(), qweight.contiguous(), scales.to(x.dtype).contiguous())


def int8_weight_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same product in float64, rounded once to x's dtype (what the tests hold the kernel to)."""
    return ((x.double() @ qweight.double().T) * scales.double()).to(x.dtype)
