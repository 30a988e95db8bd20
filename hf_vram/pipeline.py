"""One pipeline carries out a ``VramOptimizationConfig``, in a fixed order.

Order: prune -> fuse -> quantize -> attach KV-cache settings. Pruning first, so that fusion and quantization work
on the smaller matrices; fusion before quantization, so that a fused projection is quantized as one weight.
Both doors use it: ``hf_vram.optimize(model, config)`` for a model in memory, and ``from_pretrained(...,
quantization_config=config)`` through ``hf_vram.hf.quantizer``, which runs the same stages on the meta model
before the weights load and converts each tensor as it arrives.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from hf_vram.config import VramOptimizationConfig
from hf_vram.fusion import fuse_model
from hf_vram.pruning import prune_model
from hf_vram.quant.apply import check_finite_weights, quantize_model

logger = logging.getLogger("hf_vram")

STAGE_ORDER = ("pruning", "fusion", "quantization", "kv_cache")
def optimize(
    model: nn.Module, config: VramOptimizationConfig | dict | str, calibration_ids: torch.Tensor | None = None
) -> nn.Module:
    """Apply ``config`` to a model already in memory (e.g. one loaded from GGUF), in place; returns the model.

    A model Transformers loaded from a compressed-tensors checkpoint keeps its quantized weights: they are converted
    to hf_vram's layers bit for bit (``hf_vram.hf.compressed_tensors``), never through float.

    ``config`` may be a ``VramOptimizationConfig``, a dict of sections, or a preset name / YAML path.
    ``calibration_ids`` (``[n, seq]`` token ids) feed pruning scores and calibrated quantization; by default they tokenize CPython's
    pydoc text with the model's tokenizer. The model then saves with ``save_pretrained`` and reloads with plain ``from_pretrained`` after ``import hf_vram``.
    """
    config = as_config(config)
    if config.quantization.enabled and config.quantization.backend == "bitsandbytes":
        raise NotImplementedError(
            "hf_vram: backend 'bitsandbytes' quantizes while weights load; use from_pretrained(path, "
            "quantization_config=config) (save this model first if it only exists in memory)."
        )
    if getattr(model, "hf_quantizer", None) is not None:
        method = str(getattr(model, "quantization_method", "another method"))
        if method.removeprefix("QuantizationMethod.").lower().replace("_", "-") != "compressed-tensors":
            raise ValueError(f"hf_vram: this model is already quantized ({method}); optimize the float model instead.")
        from hf_vram.hf.compressed_tensors import convert_compressed_model

        # A compressed-tensors checkpoint (llm-compressor's GPTQ/AWQ, vLLM's format): its codes become hf_vram's
        # layers as they are; the remaining stages then run on what is still float (the embedding, norms, attention).
        model.hf_quantizer = None
        convert_compressed_model(model, config)
    plan = apply_stages(model, config, calibration_ids)
    attach(model, config, plan)
    return model


def apply_stages(model: nn.Module, config: VramOptimizationConfig, calibration_ids: torch.Tensor | None = None):
    """Plan (when ``target_memory`` asks for it), prune, fuse, quantize a float model in memory; returns the
    quantization targets. Both doors run this: ``optimize`` and ``from_pretrained`` of a float checkpoint."""
    if config.quantization.enabled or config.planner.enabled:
        check_finite_weights(model, config.quantization)
    budget_plan = None
    if config.planner.enabled and config.planner.plan is None:
        from hf_vram.planner.budget import plan_budget

        budget_plan = plan_budget(model, config, calibration_ids)
    plan = None
    if config.pruning.enabled:
        prune_model(model, config.pruning, calibration_ids)
    if config.fusion.enabled:
        fuse_model(model, config.fusion)
    if config.quantization.enabled:
        plan = quantize_model(model, config.quantization, calibration_ids)
        logger.info("hf_vram: quantized %d linear layers to %s", len(plan.linears), config.quantization.scheme)
    if budget_plan is not None:
        from hf_vram.planner.budget import measure_plan

        measure_plan(model, config, budget_plan, calibration_ids)
    return plan


def attach(model: nn.Module, config: VramOptimizationConfig, plan=None) -> None:
    """Mark a model optimized in memory the way ``from_pretrained`` marks it, so save/dequantize work alike."""
    from hf_vram.hf.quantizer import HfVramQuantizer
    from hf_vram.hf.serialization import install_save_hooks

    quantizer = HfVramQuantizer(config, pre_quantized=False)
    quantizer.plan = plan  # what was converted, what was skipped and why, what each skip pattern matched
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "config"):
        model.config.quantization_config = config
    install_save_hooks(model)
    finish_stages(model, config)


def finish_stages(model: nn.Module, config: VramOptimizationConfig) -> None:
    """Stages that act at run time rather than on weights (both doors call this after the weights are final)."""
    if config.kv_cache.enabled:
        from hf_vram.kvcache.attach import install_pooled_generate

        install_pooled_generate(model, config.kv_cache)


def as_config(config: VramOptimizationConfig | dict | str) -> VramOptimizationConfig:
    if isinstance(config, VramOptimizationConfig):
        return config
    if isinstance(config, dict):
        return VramOptimizationConfig(**config)
    if isinstance(config, str):
        if config.endswith((".yaml", ".yml")) or "\n" in config:
            return VramOptimizationConfig.from_yaml(config)
        return VramOptimizationConfig.from_preset(config)
    raise TypeError(f"hf_vram: expected a VramOptimizationConfig, dict, preset name or YAML path, got {type(config)}")
