"""Triton kernels for CUDA: matmuls that dequantize int8 / int4 weight tiles in registers.

The weight never exists in float in GPU memory: each program loads a ``BLOCK_N x BLOCK_K`` tile of codes, turns
them into the activations' dtype (exact: int8 and int4 codes are small integers) for the dot and accumulates in
float32, applying per-channel scales (int8) or each group's scale and zero (int4) to the block's dot, not to the
tile. One kernel serves decode (``M`` small, a GEMV-shaped grid of one row block whose K loop is split across
programs until the GPU's SMs are busy) and prefill (a GEMM grid); the block sizes are chosen by ``M``. Tested on the
CPU under ``TRITON_INTERPRET=1`` against ``hf_vram.kernels.reference``; timed against cuBLAS and the peers by
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.occupancy import multiprocessors
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


# Split-K for decode-sized M: one output tile per program gives cdiv(N, BLOCK_N) programs, a fraction of a GPU's
# SMs at a few thousand outputs (64 programs on the H200's 132 SMs for a 7B down-projection, whose int8 kernel read
# its weight at about 0.33 TB/s there, 0.32x cuBLAS on the fp16 weight). The K loop is split until the grid holds
# this many programs per SM, each keeping at least 4 K blocks; partial sums meet in float32. 0 turns it off (the GPU
# check's A/B row).
DECODE_PROGRAMS_PER_SM = 4
_MIN_K_BLOCKS_PER_SPLIT = 4


def _blocks(m: int) -> tuple[int, int, int]:
    if m <= 16:
        return 16, 64, 64  # decode: thin row block, wide N tiles
    return 64, 64, 64


def split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K elements per split, a multiple of ``block_k``) for one launch; (1, K) outside decode sizes."""
    k_blocks = triton.cdiv(k, block_k)
    if m > 16 or DECODE_PROGRAMS_PER_SM <= 0:
        return 1, k_blocks * block_k
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    wanted = max(1, DECODE_PROGRAMS_PER_SM * multiprocessors(device) // tiles)
    splits = max(1, min(wanted, k_blocks // _MIN_K_BLOCKS_PER_SPLIT))
    per_split = triton.cdiv(k_blocks, splits)
    return triton.cdiv(k_blocks, per_split), per_split * block_k


def half_dot(x: torch.Tensor) -> bool:
    """Whether the dots take the activations' 16-bit dtype as it is. float16 always; bfloat16 on CUDA only: the CPU
    interpreter multiplies bfloat16 dots into garbage (measured: errors of 1e10 on a 16x16 tile), so there they go
    through float32, as every dtype did before."""
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and x.device.type == "cuda")


def _int4_block_k(group_size: int, block_k: int) -> int:
    """The K block for int4: one that never straddles a group, so each block's scales and zeros are one row each."""
    step = group_size & -group_size  # the largest power of two dividing the group
    return min(block_k, step) if step >= 16 else min(block_k, group_size)


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
        K_PER_SPLIT,
        stride_xm,
        stride_wn,
        stride_ym,
        stride_ys,
        ACT_INT8: tl.constexpr,
        HALF_DOT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        if ACT_INT8:  # W8A8: int8 x int8 products accumulated exactly in int32
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < k_hi), other=0)
            if ACT_INT8:
                acc_i += tl.dot(x, w, out_dtype=tl.int32)
            elif HALF_DOT:  # codes are exact in the activations' 16-bit type: half-precision products, fp32 sums
                acc += tl.dot(x, w.to(x.dtype))
            else:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        if ACT_INT8:
            x_scale = tl.load(xs_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
            acc = acc_i.to(tl.float32) * x_scale[:, None] * scale[None, :]
        else:
            acc = acc * scale[None, :]
        if HAS_BIAS:  # once, by the first split
            bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        tl.store(
            y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :],
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
        K_PER_SPLIT,
        stride_xm,
        stride_wn,
        stride_ym,
        stride_ys,
        GROUP: tl.constexpr,
        PER_BLOCK_SCALES: tl.constexpr,
        HALF_DOT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < k_hi
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            wmask = (rn[None, :] < N) & kmask[:, None]
            byte = tl.load(w_ptr + rn[None, :] * stride_wn + (rk[:, None] // 2), mask=wmask, other=0).to(tl.int32)
            code = (byte >> ((rk[:, None] % 2) * 4)) & 0xF
            if PER_BLOCK_SCALES:
                # The block lies in one group: x . ((c - 8) s + z) = s (x . (c - 8)) + z sum(x), so the codes enter
                # the dot as exact 16-bit integers and the group's scale and zero are one row each, not a tile.
                sz = sz_ptr + ((k0 // GROUP) * N + rn) * 2
                scale = tl.load(sz, mask=rn < N, other=0.0).to(tl.float32)
                zero = tl.load(sz + 1, mask=rn < N, other=0.0).to(tl.float32)
                if HALF_DOT:
                    dots = tl.dot(x, (code - 8).to(x.dtype))
                else:
                    dots = tl.dot(x.to(tl.float32), (code - 8).to(tl.float32))
                acc += dots * scale[None, :] + tl.sum(x.to(tl.float32), axis=1)[:, None] * zero[None, :]
            else:  # groups narrower than a dot's 16-wide K step: scales per element
                g = rk[:, None] // GROUP
                scale = tl.load(sz_ptr + (g * N + rn[None, :]) * 2, mask=wmask, other=0.0).to(tl.float32)
                zero = tl.load(sz_ptr + (g * N + rn[None, :]) * 2 + 1, mask=wmask, other=0.0).to(tl.float32)
                w = (code.to(tl.float32) - 8.0) * scale + zero
                acc += tl.dot(x.to(tl.float32), w)
        if HAS_BIAS:  # once, by the first split
            bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        tl.store(
            y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("hf_vram: the CUDA path needs Triton; install it with `pip install triton`.")


def _output(m: int, n: int, splits: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """The kernel's output and its split stride: ``[M, N]`` in ``dtype``, or float32 partials ``[splits, M, N]``."""
    if splits == 1:
        return torch.empty((m, n), dtype=dtype, device=device), 0
    return torch.empty((splits, m, n), dtype=torch.float32, device=device), m * n


def _finish(y: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    return y if splits == 1 else y.sum(0).to(dtype)


def _launch_int8(x, x_scale, qweight, scales, bias, out_dtype, act_int8: bool) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    bm, bn, bk = _blocks(m)
    splits, per_split = split_k(m, n, k, bm, bn, bk, x.device)
    y, stride_ys = _output(m, n, splits, out_dtype, x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
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
        per_split,
        x.stride(0),
        qweight.stride(0),
        n,
        stride_ys,
        ACT_INT8=act_int8,
        HALF_DOT=half_dot(x),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return _finish(y, splits, out_dtype)


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
    bm, bn, bk = _blocks(m)
    bk = _int4_block_k(group_size, bk)
    splits, per_split = split_k(m, n, k, bm, bn, bk, x.device)
    y, stride_ys = _output(m, n, splits, x.dtype, x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    _int4_matmul_kernel[grid](
        x,
        packed,
        scales_zeros.contiguous(),
        bias if bias is not None else x,
        y,
        m,
        n,
        k,
        per_split,
        x.stride(0),
        packed.stride(0),
        n,
        stride_ys,
        GROUP=group_size,
        PER_BLOCK_SCALES=bk >= 16 and group_size % bk == 0,
        HALF_DOT=half_dot(x),
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return _finish(y, splits, x.dtype)
