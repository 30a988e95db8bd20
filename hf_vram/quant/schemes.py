"""The math of hf_vram's weight formats: quantize a float matrix, and rebuild it.

Formats (the layout that is saved; kernels may hold a device-specific layout in memory):

* int8, symmetric per output channel: ``qweight`` int8 ``[out, in]``, ``scales`` float32 ``[out]``,
  ``w = qweight * scales[:, None]``.
* int4, group-wise along the input dimension: ``qweight`` uint8 ``[out, in_padded / 2]`` holding two 4-bit codes
  ``q`` in 0..15 per byte (element ``2i`` in the low nibble), ``scales_zeros`` bfloat16 ``[in_padded / group, out, 2]``
  with ``w = (q - 8) * scale + zero`` (the convention of torch's packed int4 kernels, so no conversion is needed
  at run time). Symmetric groups have ``zero = 0``. Asymmetric groups use an integer zero point ``zp`` in 0..15,
  ``w = (q - zp) * scale``, stored as ``zero = bfloat16((8 - zp) * scale)``: the convention of GPTQ, AWQ and
  compressed-tensors (``hf_vram.hf.compressed_tensors`` recovers ``zp`` exactly, since the bf16 rounding of
  ``zero`` moves ``zero / scale`` by at most ``8 * 2**-9``). An input size that the group does not divide is
  zero-padded to a multiple of the group (the padding repeats the row's last real value while scales are chosen,
  so it never widens a group's range, and it multiplies zero-padded activations at run time).
"""

from __future__ import annotations

import torch

from hf_vram.kernels.packing import pack_int4, unpack_int4

INT4_SCALE_DTYPE = torch.bfloat16
# Clipping ratios tried per int4 group by the error-minimising search (1.0 = plain min/max).
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8; returns ``(qweight int8, scales float32)``."""
    _check_finite(weight)
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def padded_in_features(in_features: int, group_size: int) -> int:
    """The input size of an int4 layer after zero-padding to a whole number of groups."""
    return -(-in_features // group_size) * group_size


def pad_columns(w: torch.Tensor, padded: int) -> torch.Tensor:
    """``w`` widened to ``padded`` columns by repeating its last column (so padding never widens a group's range)."""
    extra = padded - w.shape[1]
    if extra == 0:
        return w
    return torch.cat([w, w[:, -1:].expand(-1, extra)], dim=1)


def int4_grid(groups: torch.Tensor, ratio: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored ``(scale, zero)`` of ``groups`` ``[..., g]`` for one clipping ratio, both rounded to bfloat16 as
    they are saved (so codes chosen against them are exact for the stored values), returned as float32.

    Asymmetric: the range is widened to include 0 and the zero point is an integer (see the module docstring).
    """
    if symmetric:
        scale = (groups.abs().amax(-1) * ratio / 7.0).to(INT4_SCALE_DTYPE).float().clamp(min=1e-12)
        return scale, torch.zeros_like(scale)
    lo = groups.amin(-1).clamp(max=0) * ratio
    hi = groups.amax(-1).clamp(min=0) * ratio
    scale = ((hi - lo) / 15.0).to(INT4_SCALE_DTYPE).float().clamp(min=1e-12)
    zero_point = torch.round(-lo / scale).clamp_(0, 15)
    return scale, ((8.0 - zero_point) * scale).to(INT4_SCALE_DTYPE).float()


def int4_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of ``values`` on the grid ``(q - 8) * scale + zero`` (float, same shape as ``values``)."""
    return torch.round((values - zero) / scale + 8.0).clamp_(0, 15)


def search_int4_grid(groups: torch.Tensor, symmetric: bool, scale_search: str) -> tuple[torch.Tensor, ...]:
    """``(scale, zero, codes)`` of ``groups`` ``[N, G, g]``: with ``scale_search="clip"`` each group takes, from
    ``CLIP_RATIOS``, the range that minimises its squared reconstruction error; else its plain min/max range.
    Plain rounding and GPTQ's static groups (``quant.gptq``) both choose their grid here."""
    ratios = CLIP_RATIOS if scale_search == "clip" else (1.0,)
    best_err = best_scale = best_zero = best_q = None
    for ratio in ratios:
        scale, zero = int4_grid(groups, ratio, symmetric)
        q = int4_codes(groups, scale[..., None], zero[..., None])
        err = ((q - 8.0) * scale[..., None] + zero[..., None] - groups).pow_(2).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero, best_q = err, scale, zero, q
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_q = torch.where(better[..., None], q, best_q)
    return best_scale, best_zero, best_q


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, symmetric: bool = False, scale_search: str = "clip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int4; returns ``(packed uint8 [out, in_padded/2], scales_zeros [n_groups, out, 2])``.

    With ``scale_search="clip"`` every group takes, from ``CLIP_RATIOS``, the range that minimises its squared
    reconstruction error; the scale and zero are rounded to bfloat16 *before* the codes are chosen, so the codes
    fit the stored scale exactly (``int4_grid``).
    """
    _check_finite(weight)
    out_features, in_features = weight.shape
    padded = padded_in_features(in_features, group_size)
    w = pad_columns(weight.detach().float(), padded)
    groups = w.view(out_features, padded // group_size, group_size)
    scale, zero, q = search_int4_grid(groups, symmetric, scale_search)
    codes = q.reshape(out_features, padded).to(torch.uint8)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(INT4_SCALE_DTYPE)
    return pack_int4(codes), scales_zeros


def dequantize_int4(
    packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild ``[out, in_features]`` from the saved int4 layout."""
    codes = unpack_int4(packed).float()
    n_groups, out_features, _ = scales_zeros.shape
    group = codes.shape[1] // n_groups
    sz = scales_zeros.float().transpose(0, 1)  # [out, n_groups, 2]
    w = (codes.view(out_features, n_groups, group) - 8.0) * sz[..., :1] + sz[..., 1:]
    return w.reshape(out_features, -1)[:, :in_features].to(dtype)


def _check_finite(weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"hf_vram: cannot quantize a weight holding {bad} NaN/Inf value(s) (shape {tuple(weight.shape)}); "
            "the float checkpoint is corrupted or overflowed: repair it, or list this module in "
            "quantization.modules_to_not_convert."
        )
