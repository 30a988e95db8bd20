"""Making hf_vram's quantized layers in place of float ones: every door (in-memory quantization, calibration, the
``from_pretrained`` skeleton, compressed-tensors import, the planner's cost model) builds layers here, so a layer
is shaped, typed and installed the same way whichever door made it."""

from __future__ import annotations

import torch
import torch.nn as nn

from hf_vram.config import QuantizationSection
from hf_vram.quant.linear import SCHEME_LAYERS, QuantLinear


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(in, out, transposed)``; GPT-2's Conv1D stores its weight as ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = module.weight
    return weight.shape[0], weight.shape[1], True


def layer_kwargs(section: QuantizationSection, scheme: str, act_scales: bool) -> dict:
    kwargs: dict = {"compute_dtype": section.compute_dtype, "calibrated": act_scales}
    if scheme == "int4":
        kwargs.update(
            group_size=section.group_size,
            symmetric=section.symmetric,
            scale_search=section.scale_search,
            scale_dtype=getattr(torch, section.scale_dtype),
        )
    return kwargs


def make_layer(
    module: nn.Module, section: QuantizationSection, device, scheme: str | None = None, act_scales: bool = False
) -> QuantLinear:
    """An empty quantized layer shaped like ``module`` (``scheme``: a per-layer override of the section's;
    ``act_scales``: the layer divides its input by saved activation scales at run time)."""
    scheme = scheme or section.scheme
    in_f, out_f, transposed = linear_shape(module)
    bias = getattr(module, "bias", None)
    layer = SCHEME_LAYERS[scheme](
        in_f,
        out_f,
        bias is not None,
        bias_dtype=bias.dtype if bias is not None else torch.float32,
        device=device,
        **layer_kwargs(section, scheme, act_scales),
    )
    layer.transposed_source = transposed
    return layer


def install_layer(
    model: nn.Module, name: str, layer: QuantLinear, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None
) -> QuantLinear:
    """Fill ``layer`` with its saved-format ``tensors`` and the float ``bias``, and put it at ``name`` in ``model``."""
    layer.load_quantized(tensors)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    model.set_submodule(name, layer)
    return layer


def float_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` float32 (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight.detach().float()
    return w if isinstance(module, nn.Linear) else w.t()
