"""How much each linear layer's quantization costs: a Fisher-weighted weight error, from one backward pass.

For a small weight change ``dW`` the loss rises by about ``0.5 * sum(F * dW^2)`` where ``F`` is the diagonal
Fisher information, estimated by the squared gradients of the calibration loss (HAWQ/OBS-style, diagonal). The
planner needs only the ordering of layers and schemes by cost per byte saved, which this gives in seconds for
every layer at once (quantizing layers one by one and re-measuring the loss would cost a forward each).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hf_vram.config import QuantizationSection
from hf_vram.quant.build import make_layer


def fisher_diagonal(
    model: nn.Module, names: list[str], calibration_ids: torch.Tensor, batch_size: int = 2
) -> tuple[dict[str, torch.Tensor], float]:
    """Mean squared gradient of each named layer's weight over the calibration batches, and the mean loss."""
    modules = {name: model.get_submodule(name) for name in names}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    was_training = model.training
    model.eval()
    fisher = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
    losses = []
    device = next(model.parameters()).device
    try:
        batches = calibration_ids.split(batch_size)
        for batch in batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses.append(loss.item())
            for name, m in modules.items():
                fisher[name] += m.weight.grad.float() ** 2 / len(batches)
                m.weight.grad = None
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    return fisher, sum(losses) / len(losses)


def layer_costs(
    model: nn.Module, fisher: dict[str, torch.Tensor], section: QuantizationSection, schemes: tuple[str, ...] = ("int8", "int4")
) -> dict[str, dict[str, float]]:
    """``{layer: {scheme: 0.5 * sum(F * (W - Q(W))^2)}}``, with ``none`` costing 0."""
    costs = {}
    for name, f in fisher.items():
        module = model.get_submodule(name)
        transposed = not isinstance(module, nn.Linear)  # GPT-2's Conv1D stores [in, out]
        weight = (module.weight.detach().t() if transposed else module.weight.detach()).float().cpu()
        f_layer = (f.t() if transposed else f).cpu()
        costs[name] = {"none": 0.0}
        for scheme in schemes:
            layer = make_layer(module, section, "cpu", scheme)
            error = layer.dequantize_from(layer.quantize_weight(weight)) - weight
            costs[name][scheme] = 0.5 * float((f_layer * error**2).sum())
    return costs
