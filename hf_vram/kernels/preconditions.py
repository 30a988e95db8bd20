"""What every kernel entry needs from its inputs, enforced in one place before any torch or Triton kernel runs.

torch's packed CPU kernels and our Triton kernels index raw pointers: they assume contiguous rows, the dtypes and
shapes they were written for, and (``torch._weight_int8pack_mm`` on the AVX-512 path, with bfloat16 activations)
a weight aligned to 16 bytes, or the process dies with SIGSEGV. safetensors memory-maps tensors at 8-byte offsets,
so a reloaded checkpoint hands exactly such weights to the kernel. Two kinds of guard follow:

* ``kernel_ready``: returns the tensor itself when it is contiguous and 64-byte aligned (a pointer check), else an
  aligned contiguous copy. Weights go through it once, when a layer is loaded or moved (``prepare_for_device``);
  the kernel wrappers call it again on every input, which costs a pointer check for a prepared weight and a copy
  only for an activation view that would otherwise reach the kernel misaligned or strided.
* ``check_*``: dtype and shape rules that no copy can fix raise ``ValueError`` naming the entry and the fix.
"""

from __future__ import annotations

import torch

# torch's CPU allocator aligns every allocation to 64 bytes (c10's gAlignment); CUDA's to 256.
ALIGNMENT = 64
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_kernel_ready(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` when contiguous and 64-byte aligned, else a contiguous copy in a fresh (aligned) allocation.

    Inside a compiled graph pointers cannot be read; there every tensor is an inductor allocation or a weight made
    kernel-ready when its layer was loaded, so contiguity is what is left to ensure.
    """
    if torch.compiler.is_compiling():
        return t.contiguous()
    if is_kernel_ready(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def kernel_ready_opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else kernel_ready(t)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its last dimension has stride 1 (kernels that take the other strides as arguments), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fail(entry: str, problem: str, fix: str) -> None:
    raise ValueError(f"hf_vram kernel {entry}: {problem}; {fix}")


def check_activations(x: torch.Tensor, in_features: int | None, entry: str) -> None:
    """``x`` must be ``[rows, in_features]`` (any width for None) in a float dtype the kernels take."""
    if x.dim() != 2 or (in_features is not None and x.shape[1] != in_features):
        _fail(
            entry,
            f"activations of shape {tuple(x.shape)}, expected [rows, {in_features or 'in_features'}]",
            "reshape the input to 2-D rows of the layer's input size (QuantLinear.forward does this)",
        )
    if x.dtype not in FLOAT_DTYPES:
        _fail(entry, f"activations of dtype {x.dtype}", "pass float32, bfloat16 or float16 activations")


def check_compute_dtype(dtype: torch.dtype, entry: str) -> None:
    if dtype not in FLOAT_DTYPES:
        _fail(entry, f"compute dtype {dtype}", "use float32, bfloat16 or float16 (quantization.compute_dtype)")


def check_int8_weight(qweight: torch.Tensor, scales: torch.Tensor, entry: str) -> None:
    """int8 codes ``[out, in]`` with one float scale per output row."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        _fail(
            entry,
            f"weight codes of dtype {qweight.dtype} and shape {tuple(qweight.shape)}",
            "int8 [out, in] codes are required; re-quantize or reload the checkpoint",
        )
    if scales.dim() != 1 or scales.shape[0] != qweight.shape[0] or not scales.is_floating_point():
        _fail(
            entry,
            f"scales of shape {tuple(scales.shape)} and dtype {scales.dtype} for {qweight.shape[0]} rows",
            "one float scale per output row is required; the checkpoint is inconsistent, save it again",
        )


def check_int4_weight(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, in_features: int, entry: str) -> None:
    """Two codes per byte ``[out, in/2]`` and ``(scale, zero)`` pairs ``[in/group, out, 2]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != in_features:
        _fail(
            entry,
            f"packed codes of dtype {packed.dtype} and shape {tuple(packed.shape)} for {in_features} inputs",
            "uint8 [out, in/2] codes are required; reload the checkpoint",
        )
    if group_size <= 0 or in_features % group_size:
        _fail(
            entry,
            f"group size {group_size} does not divide the padded input size {in_features}",
            "inputs must be zero-padded to a whole number of groups (Int4Linear does this)",
        )
    expected = (in_features // group_size, packed.shape[0], 2)
    if tuple(scales_zeros.shape) != expected or not scales_zeros.is_floating_point():
        _fail(
            entry,
            f"scales_zeros of shape {tuple(scales_zeros.shape)}, expected {expected}",
            "the checkpoint is inconsistent with its config; save it again",
        )


def check_cpu_int4_shape(out_features: int, in_features: int, entry: str) -> None:
    """torch's int4 CPU kernel packs weights in blocks of 16 output rows over an even input size."""
    if out_features % 16 or in_features % 2:
        _fail(
            entry,
            f"a [{out_features}, {in_features}] weight in the CPU int4 layout",
            "that layout needs out_features % 16 == 0 and an even input size (cpu_int4_supported says when)",
        )


# torch._weight_int8pack_mm with bfloat16/float16 activations reads whole vectors of a weight row: on the AVX2
# path an input size that is not a multiple of 8 crashes it (17 x 130, SIGSEGV) or returns garbage (1 x 34:
# errors of 1e13), found by tests/kernels/fuzz_worker.py. Rows also stay 16-byte aligned only when the input size is
# a multiple of 16. 32 (the bfloat16 lanes of an AVX-512 register) covers both paths; other sizes take the
# dequantizing path (``dispatch``).
INT8_PACKED_K_MULTIPLE = 32


def int8_packed_supported(in_features: int) -> bool:
    return in_features % INT8_PACKED_K_MULTIPLE == 0


def check_int8_packed_shape(in_features: int, entry: str) -> None:
    if not int8_packed_supported(in_features):
        _fail(
            entry,
            f"input size {in_features} is not a multiple of {INT8_PACKED_K_MULTIPLE}",
            "torch's packed int8 kernel crashes or returns garbage there; use dispatch.int8_linear, which "
            "dequantizes for such shapes",
        )


def require_contiguous(t: torch.Tensor, name: str, entry: str) -> None:
    """For large state (a KV pool) that must not be copied per call: refuse instead of copying."""
    if not t.is_contiguous():
        _fail(entry, f"{name} is not contiguous (strides {t.stride()})", "pass the pool's own storage, not a view of it")
