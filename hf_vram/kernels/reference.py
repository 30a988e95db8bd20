"""Plain-torch definitions of the quantized matmuls: the ground truth for every fast path."""

from __future__ import annotations

import torch


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T`` in float32, returned in ``x.dtype``."""
    w = qweight.float() * scales.float()[:, None]
    return (x.float() @ w.t()).to(x.dtype)


def int4_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W = (codes - 8) * scale + zero``; ``codes`` uint8 ``[N, K]`` (unpacked)."""
    n, k = codes.shape
    sz = scales_zeros.float().transpose(0, 1)  # [N, G, 2]
    w = (codes.float().view(n, k // group_size, group_size) - 8.0) * sz[..., :1] + sz[..., 1:]
    return (x.float() @ w.reshape(n, k).t()).to(x.dtype)


def w8a8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations times per-channel int8 weights, accumulated exactly."""
    xf = x.float()
    x_scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    xq = torch.round(xf / x_scale).clamp(-127, 127)
    acc = xq.double() @ qweight.double().t()
    return (acc.float() * x_scale * scales.float()[None, :]).to(x.dtype)
