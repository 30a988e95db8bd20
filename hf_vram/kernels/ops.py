"""The entry points layers call for quantized matmuls, eager and under ``torch.compile`` alike.

Eager, they run ``dispatch`` (kernel by device, CPU path and rows; every input checked first). Compiled, there are
two ways in, chosen per call while tracing:

* traced: on the CPU, when the chosen path is torch's packed kernel with its scales already in the activation
  dtype (or plain dequantize + matmul), ``dispatch`` itself is traced; inductor keeps the packed kernel as one
  extern call. This is the decode path, and the cheap one: a custom op's Python dispatch cost about 40 us per call
  here, twice the kernel's own time on SmolLM2's shapes (about 200 matmuls per decode step; BENCHMARKS.md).
* opaque: everything else (CUDA's Triton kernels, FBGEMM's W8A8, a CPU int4 layer whose scales are not in the
  activation dtype, the CPU-layout unpacking of large int4 batches) goes through a torch custom op with a fake
  implementation, so inductor never traces into a Triton launch or a pointer check. Inductor's lowering of the
  packed int8 kernel fails (``LoweringException ... Pointwise``) on scales converted inside the graph; the traced
  path exists only where that cannot happen.

FBGEMM's packed W8A8 weight is a TorchScript object that no custom op can take as an argument: layers register it
in ``PACKED_WEIGHTS`` and pass its integer handle, which a compiled graph holds as a constant.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from hf_vram.kernels import dispatch

_DTYPE_CODES = {0: None, 1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
DTYPE_CODE = {v: k for k, v in _DTYPE_CODES.items()}


def int8_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    kernel_scales: Tensor | None,
    bias: Tensor | None,
    compute_dtype: torch.dtype | None,
):
    """``x [M, K]`` through an int8 ``[N, K]`` weight with per-row scales; result in ``x.dtype``.

    ``kernel_scales``: the scales already in the packed kernel's activation dtype (``KernelCopy``), or None.
    """
    if torch.compiler.is_compiling() and not dispatch.int8_traceable(x, kernel_scales, compute_dtype):
        return int8_linear_op(x, qweight, scales, bias, DTYPE_CODE[compute_dtype])
    return dispatch.int8_linear(x, qweight, scales, bias, compute_dtype, kernel_scales)


def int4_linear(
    x: Tensor,
    qweight: Tensor,
    layout: str,
    scales_zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
    compute_dtype: torch.dtype | None,
):
    """``x [M, K_padded]`` through an int4 weight held in ``layout`` (the saved one or the CPU kernel's)."""
    if torch.compiler.is_compiling() and not dispatch.int4_traceable(x, layout, scales_zeros, compute_dtype):
        return int4_linear_op(x, qweight, layout, scales_zeros, group_size, bias, DTYPE_CODE[compute_dtype])
    return dispatch.int4_linear(x, qweight, layout, scales_zeros, group_size, bias, compute_dtype)


def w8a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, packed_handle: int):
    """Per-token int8 activations times int8 weights: FBGEMM through ``packed_handle`` (> 0) or the exact path."""
    if torch.compiler.is_compiling():
        return w8a8_linear_op(x, qweight, scales, bias, packed_handle)
    return dispatch.w8a8_linear(x, qweight, PACKED_WEIGHTS.get(packed_handle), scales, bias)


@torch.library.custom_op("hf_vram::int8_linear", mutates_args=())
def int8_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, compute_dtype: int) -> Tensor:
    return dispatch.int8_linear(x, qweight, scales, bias, _DTYPE_CODES[compute_dtype])


@int8_linear_op.register_fake
def _(x, qweight, scales, bias, compute_dtype):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("hf_vram::int4_linear", mutates_args=())
def int4_linear_op(
    x: Tensor, qweight: Tensor, layout: str, scales_zeros: Tensor, group_size: int, bias: Tensor | None, compute_dtype: int
) -> Tensor:
    return dispatch.int4_linear(x, qweight, layout, scales_zeros, group_size, bias, _DTYPE_CODES[compute_dtype])


@int4_linear_op.register_fake
def _(x, qweight, layout, scales_zeros, group_size, bias, compute_dtype):
    return x.new_empty(x.shape[0], scales_zeros.shape[1])


# -- W8A8 ----------------------------------------------------------------------------------------------------------
PACKED_WEIGHTS: dict[int, object] = {}
_handles = itertools.count(1)


def register_packed(owner: object, packed: object) -> int:
    """Keep an FBGEMM packed weight reachable by an integer handle for as long as ``owner`` lives."""
    handle = next(_handles)
    PACKED_WEIGHTS[handle] = packed
    weakref.finalize(owner, PACKED_WEIGHTS.pop, handle, None)
    return handle


def release_packed(handle: int) -> None:
    PACKED_WEIGHTS.pop(handle, None)


@torch.library.custom_op("hf_vram::w8a8_linear", mutates_args=())
def w8a8_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, packed_handle: int) -> Tensor:
    return dispatch.w8a8_linear(x, qweight, PACKED_WEIGHTS.get(packed_handle), scales, bias)


@w8a8_linear_op.register_fake
def _(x, qweight, scales, bias, packed_handle):
    return x.new_empty(x.shape[0], scales.shape[0])
