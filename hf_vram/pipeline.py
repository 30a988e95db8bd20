"""One pipeline carries out a ``VramOptimizationConfig``: an ordered list of technique stages.

Order: (choose int8 K/V layers) -> (plan) -> prune -> fuse -> quantize -> attach the KV cache. Pruning first, so
that fusion and quantization work on the smaller matrices; fusion before quantization, so that a fused projection is
quantized as one weight; the KV cache last, since it acts at run time rather than on weights. ``apply`` runs the weight stages of a float
model in memory, ``finish`` the run-time ones once the weights are final. Both doors call them: ``hf_vram.optimize``
(``hf_vram.api``) for a model in memory, and ``from_pretrained(..., quantization_config=config)`` through
``hf_vram.hf.quantizer``.

This module sits between the techniques (which it calls) and the doors (which call it): it imports no door.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hf_vram.config import VramOptimizationConfig
from hf_vram.fusion import fuse_model
from hf_vram.kvcache.attach import install_pooled_generate, install_prefill_chunk
from hf_vram.kvcache.continuous import install_continuous_batching_guard
from hf_vram.kvcache.layer_widths import counted_width
from hf_vram.kvcache.readback import choose_wide_layers
from hf_vram.planner.budget import measure_plan, plan_budget
from hf_vram.pruning import prune_model
from hf_vram.quant.apply import check_finite_weights, quantize_model
from hf_vram.quant.select import QuantTargets

logger = logging.getLogger("hf_vram")


@dataclass(frozen=True)
class Stage:
    """One technique: when the config enables it, what it does to the weights (``apply``, on a float model in
    memory) and what it wires in for run time (``finish``, once the weights are final)."""

    name: str
    enabled: Callable[[VramOptimizationConfig], bool]
    apply: Callable[[nn.Module, VramOptimizationConfig, torch.Tensor | None], Any] | None = None
    finish: Callable[[nn.Module, VramOptimizationConfig], None] | None = None


def _quantize(model: nn.Module, config: VramOptimizationConfig, ids: torch.Tensor | None) -> QuantTargets:
    targets = quantize_model(model, config.quantization, ids)
    logger.info("hf_vram: quantized %d linear layers to %s", len(targets.linears), config.quantization.scheme)
    return targets


STAGES: tuple[Stage, ...] = (
    Stage("pruning", lambda c: c.pruning.enabled, apply=lambda m, c, ids: prune_model(m, c.pruning, ids)),
    Stage("fusion", lambda c: c.fusion.enabled, apply=lambda m, c, ids: fuse_model(m, c.fusion)),
    Stage("quantization", lambda c: c.quantization.enabled, apply=_quantize),
    Stage("kv_cache", lambda c: c.kv_cache.enabled, finish=lambda m, c: install_pooled_generate(m, c.kv_cache)),
    Stage(
        "prefill_chunk", lambda c: c.kv_cache.prefill_chunk is not None, finish=lambda m, c: install_prefill_chunk(m, c.kv_cache)
    ),
    # every hf_vram model: what Transformers' continuous batching cannot run is refused before a request runs
    Stage("continuous_batching", lambda c: True, finish=lambda m, c: install_continuous_batching_guard(m)),
)


def apply(model: nn.Module, config: VramOptimizationConfig, calibration_ids: torch.Tensor | None = None) -> QuantTargets | None:
    """Plan (when ``target_memory`` asks for it), then run every enabled weight stage in order on a float model in
    memory; returns the quantization targets (what was converted, what was skipped and why), or None."""
    if config.quantization.enabled or config.planner.enabled:
        check_finite_weights(model, config.quantization)
    if counted_width(config.kv_cache):  # a count of int8 (int4) K/V layers: chosen on the float model first
        choose_wide_layers(model, config.kv_cache, calibration_ids)
    budget_plan = None
    if config.planner.enabled and config.planner.plan is None:
        budget_plan = plan_budget(model, config, calibration_ids)
    results = {}
    for stage in STAGES:
        if stage.apply is not None and stage.enabled(config):
            results[stage.name] = stage.apply(model, config, calibration_ids)
    if budget_plan is not None:
        measure_plan(model, config, budget_plan, calibration_ids)
    return results.get("quantization")


def finish(model: nn.Module, config: VramOptimizationConfig) -> None:
    """Run every enabled run-time stage (both doors call this after the weights are final)."""
    for stage in STAGES:
        if stage.finish is not None and stage.enabled(config):
            stage.finish(model, config)
