"""hf_vram's quantized matmuls as torch custom ops, so ``torch.compile`` sees one opaque call per matmul.

Inductor cannot lower torch's packed CPU kernels when it traces into them (``LoweringException ... Pointwise``), and
it must not trace into Triton launches or the preconditions' pointer checks either. Each op here has a fake
implementation (output shape and dtype only) for tracing; the real one runs ``dispatch``, which picks the kernel by
device, CPU path and rows and checks every input first. Layers call these ops, never the kernels directly, so the
eager and compiled paths run the same code: ``int8_linear`` etc. call ``dispatch`` directly in eager mode (a custom
op's Python dispatch costs tens of microseconds, times ~200 matmuls per decode step) and the op while compiling.

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


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, compute_dtype: torch.dtype | None):
    """``x [M, K]`` through an int8 ``[N, K]`` weight with per-row scales; result in ``x.dtype``."""
    if torch.compiler.is_compiling():
        return int8_linear_op(x, qweight, scales, bias, DTYPE_CODE[compute_dtype])
    return dispatch.int8_linear(x, qweight, scales, bias, compute_dtype)


def int4_linear(x: Tensor, qweight: Tensor, layout: str, scales_zeros: Tensor, group_size: int, bias: Tensor | None,
                compute_dtype: torch.dtype | None):  # fmt: skip
    """``x [M, K_padded]`` through an int4 weight held in ``layout`` (the saved one or the CPU kernel's)."""
    if torch.compiler.is_compiling():
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
