"""Triton kernels for CUDA: matmuls that dequantize int8 / int4 weight tiles in registers.

The weight never exists in float in GPU memory: each program loads a ``BLOCK_N x BLOCK_K`` tile of codes, scales
it in registers and accumulates in float32. One kernel serves decode (``M`` small, a GEMV-shaped grid of one row
block) and prefill (a GEMM grid); the block sizes are chosen by ``M``. Tested on the CPU under
``TRITON_INTERPRET=1`` against ``hf_vram.kernels.reference``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.preconditions import (
    check_activations,
    check_int4_weight,
    check_int8_weight,
    kernel_ready,
    kernel_ready_opt,
)

try:  # Triton is optional: CPU-only installs run without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False


def _blocks(m: int) -> tuple[int, int, int]:
    if m <= 16:
        return 16, 64, 64  # decode: thin row block, wide N tiles
    return 64, 64, 64


if HAVE_TRITON:

    @triton.jit
    def _int8_matmul_kernel(
        x_ptr,
        xs_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        ACT_INT8: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if ACT_INT8:  # W8A8: int8 x int8 products accumulated exactly in int32
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)
            if ACT_INT8:
                acc_i += tl.dot(x, w, out_dtype=tl.int32)
            else:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        if ACT_INT8:
            x_scale = tl.load(xs_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
            acc = acc_i.to(tl.float32) * x_scale[:, None] * scale[None, :]
        else:
            acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rm[:, None] * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr,
        w_ptr,
        sz_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            wmask = (rn[None, :] < N) & kmask[:, None]
            byte = tl.load(w_ptr + rn[None, :] * stride_wn + (rk[:, None] // 2), mask=wmask, other=0).to(tl.int32)
            code = (byte >> ((rk[:, None] % 2) * 4)) & 0xF
            g = rk[:, None] // GROUP
            scale = tl.load(sz_ptr + (g * N + rn[None, :]) * 2, mask=wmask, other=0.0).to(tl.float32)
            zero = tl.load(sz_ptr + (g * N + rn[None, :]) * 2 + 1, mask=wmask, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - 8.0) * scale + zero
            acc += tl.dot(x.to(tl.float32), w)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rm[:, None] * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("hf_vram: the CUDA path needs Triton; install it with `pip install triton`.")


def _launch_int8(x, x_scale, qweight, scales, bias, out_dtype, act_int8: bool) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    bm, bn, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_matmul_kernel[grid](
        x,
        x_scale,
        qweight,
        scales,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        y.stride(0),
        ACT_INT8=act_int8,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return y


def int8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """``x [M, K] @ (qweight [N, K] * scales[:, None]).T (+ bias)`` in ``x.dtype``."""
    _require_triton()
    check_activations(x, qweight.shape[1], "int8_matmul_triton")
    check_int8_weight(qweight, scales, "int8_matmul_triton")
    x, qweight, scales = kernel_ready(x), kernel_ready(qweight), kernel_ready(scales)
    return _launch_int8(x, scales, qweight, scales, kernel_ready_opt(bias), x.dtype, act_int8=False)


def w8a8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
    """Per-token dynamic int8 activations times per-channel int8 weights, int32 accumulation, in ``x.dtype``."""
    _require_triton()
    check_activations(x, qweight.shape[1], "w8a8_matmul_triton")
    check_int8_weight(qweight, scales, "w8a8_matmul_triton")
    qweight, scales, bias = kernel_ready(qweight), kernel_ready(scales), kernel_ready_opt(bias)
    xf = x.float()
    x_scale = xf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    xq = torch.round(xf / x_scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return _launch_int8(xq, x_scale, qweight, scales, bias, x.dtype, act_int8=True)


def int4_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
):
    """``x [M, K_padded] @ W.T`` for the saved int4 layout (``packed`` uint8 ``[N, K_padded/2]``)."""
    _require_triton()
    check_activations(x, packed.shape[1] * 2, "int4_matmul_triton")
    check_int4_weight(packed, scales_zeros, group_size, packed.shape[1] * 2, "int4_matmul_triton")
    x, packed, bias = kernel_ready(x), kernel_ready(packed), kernel_ready_opt(bias)
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(m)
    bk = min(bk, group_size)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int4_matmul_kernel[grid](
        x,
        packed,
        scales_zeros.contiguous(),
        bias if bias is not None else x,
        y,
        m,
        n,
        k,
        x.stride(0),
        packed.stride(0),
        y.stride(0),
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return y
