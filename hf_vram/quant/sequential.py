"""Calibrated quantization one decoder block at a time: AWQ scales, GPTQ, or both (``quantization.calibration``).

The calibration windows run through the model once, up to the first decoder block, whose inputs (hidden states
and the keyword arguments the model passes it: masks, rotary embeddings) are kept. Then, block by block:

1. the float block runs on the kept inputs while hooks record what reaches each target layer: the Hessian
   ``2 X^T X / n`` per input (shared by layers reading the same tensor), ``mean |x|`` per channel, and up to
   ``SAMPLE_ROWS`` rows for the AWQ search;
2. AWQ (``awq``, ``awq+gptq``): a scale per scale group, folded into the producer where possible (``awq.py``),
   else kept by the layers as run-time ``act_scales``; the Hessians follow (``H' = S^-1 H S^-1``);
3. every target layer is quantized, by GPTQ (``gptq``, ``awq+gptq``) or plain rounding, and swapped in;
4. the quantized block runs on the kept inputs: its outputs are the next block's inputs, so each block is calibrated
   on what the already-quantized model really feeds it (GPTQ's sequential mode).

Peak memory is the model plus one block's inputs and outputs for the calibration windows (and one block's
Hessians), never a second copy of the model. Layers outside the decoder blocks are rounded plainly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hf_vram.config import QuantizationSection
from hf_vram.quant import awq, schemes
from hf_vram.quant.build import float_weight, install_layer
from hf_vram.quant.gptq import HessianAccumulator, Int4Grid, Int8Grid, gptq

logger = logging.getLogger("hf_vram")
SAMPLE_ROWS = 512
BATCH_WINDOWS = 4


class _StopForward(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


@dataclass
class _InputStats:
    """What reached one input tensor (shared by a scale group) over the calibration windows."""

    hessian: HessianAccumulator
    abs_sum: torch.Tensor
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, per_batch: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.hessian.add(x)
        self.abs_sum += x.abs().sum(0).double()
        self.rows += x.shape[0]
        step = max(1, x.shape[0] // per_batch)
        self.samples.append(x[::step][:per_batch].clone())


def decoder_blocks(model: nn.Module, targets: list[str]) -> tuple[str, list[nn.Module]]:
    """The ``nn.ModuleList`` holding the most target layers (the decoder layers), as ``(name, blocks)``."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(t.startswith(name + ".") for t in targets)
            if count > best_count:
                best, best_count = name, count
    if best is None:
        raise ValueError("hf_vram: calibrated quantization found no decoder blocks (an nn.ModuleList of layers).")
    return best, list(model.get_submodule(best))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of the first block's call for every batch of calibration windows."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, ids.shape[0], BATCH_WINDOWS):
            try:
                model(ids[i : i + BATCH_WINDOWS].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _record(block: nn.Module, inputs, model: nn.Module, groups: list[awq.ScaleGroup]) -> dict[int, _InputStats]:
    """Statistics of each scale group's input, over every kept batch (the block runs in float, unchanged)."""
    stats: dict[int, _InputStats] = {}
    per_batch = max(1, SAMPLE_ROWS // max(1, len(inputs)))
    hooks = []
    for index, group in enumerate(groups):
        module = model.get_submodule(group.layers[0])
        in_features = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        device = module.weight.device
        stats[index] = _InputStats(
            HessianAccumulator(in_features, device), torch.zeros(in_features, dtype=torch.float64, device=device)
        )

        def hook(mod, args, index=index):
            stats[index].add(args[0], per_batch)

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def quantize_blocks(model: nn.Module, names: list[str], section: QuantizationSection, ids: torch.Tensor, make_layer) -> list[str]:
    """Quantize the target layers ``names`` block by block with ``section.calibration``; returns the layers that
    keep run-time activation scales. ``make_layer(name, module, act_scales)`` builds the empty quantized layer."""
    use_awq = section.calibration in ("awq", "awq+gptq")
    use_gptq = section.calibration in ("gptq", "awq+gptq")
    container, blocks = decoder_blocks(model, names)
    inputs = capture_block_inputs(model, blocks[0], ids)
    runtime_scaled: list[str] = []
    done: set[str] = set()
    for index, block in enumerate(blocks):
        block_name = f"{container}.{index}"
        targets = [n for n in names if n.startswith(block_name + ".")]
        groups = awq.scale_groups(model, block_name, block, targets)
        stats = _record(block, inputs, model, groups)
        # All scales are searched and folded while the block is still float (a fold may rescale another group's
        # layer, e.g. v_proj rows for o_proj), then every layer is quantized from its final float weight.
        plans = []
        for group_index, group in enumerate(groups):
            st = stats[group_index]
            runtime = use_awq and group.scaled and group.fold_into is None
            modules = [model.get_submodule(n) for n in group.layers]
            layers = [make_layer(n, m, runtime) for n, m in zip(group.layers, modules, strict=True)]
            scales = None
            if use_awq and group.scaled and st.rows:
                weights = [float_weight(m) for m in modules]
                scales = awq.search_group_scales(layers, weights, torch.cat(st.samples), (st.abs_sum / st.rows).float())
                if group.fold_into is not None:
                    awq.fold(model, group, scales)
                else:
                    runtime_scaled.extend(group.layers)
            hessian = st.hessian.hessian() if use_gptq and st.rows else None
            if hessian is not None and scales is not None:
                inv = 1.0 / scales
                hessian = hessian * inv[:, None] * inv[None, :]
            plans.append((group, modules, layers, scales, hessian))
        for group, modules, layers, scales, hessian in plans:
            for name, module, layer in zip(group.layers, modules, layers, strict=True):
                weight = float_weight(module)
                w = weight * scales[None, :] if scales is not None else weight
                tensors = gptq_tensors(layer, w, hessian, section) if hessian is not None else layer.quantize_weight(w)
                if scales is not None and group.fold_into is None:
                    tensors["act_scales"] = scales.clone()
                install_layer(model, name, layer, tensors, getattr(module, "bias", None))
                done.add(name)
        with torch.no_grad():
            inputs = [_replace_hidden(a, k, _hidden(block(*a, **k))) for a, k in inputs]
        logger.info("hf_vram: calibrated block %d/%d", index + 1, len(blocks))
    for name in names:
        if name not in done:  # outside the decoder blocks (an untied output head): plain rounding
            module = model.get_submodule(name)
            layer = make_layer(name, module, False)
            install_layer(model, name, layer, layer.quantize_weight(float_weight(module)), getattr(module, "bias", None))
    return runtime_scaled


def gptq_tensors(layer, weight: torch.Tensor, hessian: torch.Tensor, section: QuantizationSection) -> dict[str, torch.Tensor]:
    """The saved buffers of ``layer`` (int8, W8A8 or int4) for ``weight`` ``[out, in]`` quantized by GPTQ."""
    options = {"damp": section.dampening, "act_order": section.act_order}
    if layer.scheme in ("int8", "w8a8"):
        grid = Int8Grid.for_weight(weight)
        return {"qweight": gptq(weight, hessian, grid, **options).to(torch.int8), "scales": grid.scales.clone()}
    in_features = weight.shape[1]
    padded = schemes.padded_in_features(in_features, layer.group_size)
    full = schemes.pad_columns(weight, padded)
    grid = Int4Grid.for_weight(full, layer.group_size, layer.symmetric, layer.scale_search)
    codes = torch.empty(full.shape, device=full.device)
    codes[:, :in_features] = gptq(weight, hessian, grid, **options)
    if padded > in_features:  # the pad columns multiply zeros at run time: plain rounding
        group = grid.scale.shape[1] - 1
        codes[:, in_features:] = schemes.int4_codes(full[:, in_features:], grid.scale[:, group:], grid.zero[:, group:])
    return {"qweight": schemes.pack_int4(codes.to(torch.uint8)), "scales_zeros": grid.scales_zeros()}
