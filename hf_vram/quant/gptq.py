"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns not yet quantized.

For a layer ``y = x W^T`` with calibration inputs ``X``, GPTQ (Frantar et al., 2022) minimises ``||X W^T - X Q^T||``
using the Hessian ``H = 2 X^T X / n``: after rounding column ``j`` it updates the remaining columns by
``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,k`` (the optimal correction for a quadratic loss), taking the inverse through
an upper Cholesky factor. Columns are processed in blocks of ``block_size`` with lazy updates of the rest, the
standard dampening adds ``damp * mean(diag(H))`` to the diagonal, and with ``act_order`` the columns go in order of
decreasing ``diag(H)`` (the most active inputs first, while there is the most freedom to compensate).

The quantization grid is fixed per group *before* the column loop ("static groups"), from the weight being
quantized (after AWQ scaling, when both are used): with activation order the columns of one group are scattered
over the loop, and fixed groups keep the saved layout and the kernels exactly as they are for plain rounding.
``Grid`` objects hold a scheme's grid: int8 (per row, symmetric) and int4 (per row and group, the clipping search
of ``schemes.int4_grid`` on the original weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_vram.quant import schemes


@dataclass
class Int8Grid:
    """Symmetric per-row int8: ``w = q * scale``, ``q`` in -127..127."""

    scales: torch.Tensor  # [N]

    @classmethod
    def for_weight(cls, weight: torch.Tensor) -> Int8Grid:
        return cls(weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0)

    def quantize(self, column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(column / self.scales).clamp_(-127, 127)
        return q, q * self.scales


@dataclass
class Int4Grid:
    """Group-wise int4 on the stored grid ``w = (q - 8) * scale + zero`` (``schemes``), ``q`` in 0..15."""

    scale: torch.Tensor  # [N, G] float32 (bf16 values)
    zero: torch.Tensor  # [N, G]
    group_size: int

    @classmethod
    def for_weight(cls, weight: torch.Tensor, group_size: int, symmetric: bool, scale_search: str) -> Int4Grid:
        """The grid that plain rounding would choose for ``weight`` ``[N, K_padded]`` (clip search included)."""
        n, k = weight.shape
        groups = weight.view(n, k // group_size, group_size)
        scale, zero, _ = schemes.search_int4_grid(groups, symmetric, scale_search)
        return cls(scale, zero, group_size)

    def quantize(self, column: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = index // self.group_size
        scale, zero = self.scale[:, g], self.zero[:, g]
        q = schemes.int4_codes(column, scale, zero)
        return q, (q - 8.0) * scale + zero

    def scales_zeros(self) -> torch.Tensor:
        """The saved ``[G, N, 2]`` tensor."""
        return torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous().to(schemes.INT4_SCALE_DTYPE)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Int8Grid | Int4Grid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> torch.Tensor:
    """Codes ``[N, K]`` (float, in the grid's range) for ``weight`` ``[N, K]`` given ``hessian`` ``[K, K]``.

    Input channels that never fired (zero diagonal) get their weights zeroed first, as in the reference code: they
    multiply zeros on the calibration data and would otherwise make ``H`` singular.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    k = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=h.device)
    w = w[:, order]
    h = h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    hinv = _upper_cholesky_of_inverse(h)
    codes = torch.zeros_like(w)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = w_block[:, i]
            q, w_hat = grid.quantize(column, int(order[start + i]))
            codes[:, start + i] = q
            err = (column - w_hat) / hinv_block[i, i]
            w_block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, stop:] -= err_block @ hinv[start:stop, stop:]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """``U`` with ``U^T U = H^-1``; if dampening was not enough (rank-deficient calibration data), more is added."""
    eye = torch.eye(h.shape[0], device=h.device)
    extra = 0.0
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + extra * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-3 * torch.mean(torch.diag(h)).item())
    raise ValueError(
        "hf_vram GPTQ: the calibration Hessian is not positive definite even with dampening; use more calibration "
        "text (quantization.calibration_samples) or a larger quantization.dampening."
    )


class HessianAccumulator:
    """``H = 2 X^T X / n`` over every row ``X`` that reaches a layer: each batch's product in float32 (the matmul is
    most of GPTQ's cost), the running sum in float64."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.t() @ x).double()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 * self.sum / max(self.rows, 1)).float()
