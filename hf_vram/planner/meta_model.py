"""An hf_vram-shaped model on the meta device: the config's pruning and quantization, no weights, no data.

The estimator counts its bytes and runs one meta forward (shapes only) to read the KV cache layout and the peak
activation bytes, so a plan is sized before a single weight is read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

from hf_vram.config import VramOptimizationConfig
from hf_vram.pruning.prune import build_pruned_skeleton, prune_step
from hf_vram.quant.apply import build_skeleton


def model_config(source: str | Path | PretrainedConfig | nn.Module) -> PretrainedConfig:
    """The Transformers config of a local folder, a config object or a loaded model."""
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise ValueError("hf_vram estimate: the model has no Transformers config; pass its folder or config.")
        return config
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"hf_vram estimate: no config.json in {path}; pass a local model folder (estimates never download)."
        )
    return AutoConfig.from_pretrained(path)


def _float_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy without the saved quantization config, so the meta model is built float and shaped by us."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def build_meta(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    float_config = _float_config(config)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(float_config, dtype=dtype)
        except ValueError:
            return AutoModelForMaskedLM.from_config(float_config, dtype=dtype)


def shape_for_plan(model: nn.Module, plan: VramOptimizationConfig) -> nn.Module:
    """Prune the meta model as the plan says (its saved plan, or random scores at its ratios: same sizes)."""
    pruning = plan.pruning
    if not pruning.enabled:
        return model
    if pruning.plan is not None:
        build_pruned_skeleton(model, pruning)
    else:
        synthetic = copy.deepcopy(pruning)
        synthetic.method = "random"  # sizes depend on the ratios only; which heads go needs the weights
        prune_step(model, synthetic, None, 1.0)
    return model


def quantize_meta(model: nn.Module, plan: VramOptimizationConfig) -> nn.Module:
    if plan.quantization.enabled and plan.quantization.backend == "hf_vram":
        build_skeleton(model, plan.quantization, placeholder_dtype=None, float_dtype=None)
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each tensor once (tied weights share one), meta or real, plus the
    kernel copies quantized layers make once they run (``kernel_copy_bytes``)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        copy_bytes = getattr(module, "kernel_copy_bytes", None)
        total += copy_bytes() if copy_bytes is not None else 0
    return total
