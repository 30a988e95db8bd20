"""Mark a model optimized in memory the way ``from_pretrained`` marks one it loaded through ``HfVramQuantizer``,
so that ``save_pretrained``, ``dequantize`` and the Trainer treat both alike."""

from __future__ import annotations

import torch.nn as nn

from hf_vram import pipeline
from hf_vram.config import VramOptimizationConfig
from hf_vram.hf.quantizer import HfVramQuantizer
from hf_vram.hf.serialization import install_save_hooks
from hf_vram.quant.select import QuantTargets


def attach(model: nn.Module, config: VramOptimizationConfig, targets: QuantTargets | None = None) -> nn.Module:
    """Give ``model`` an ``HfVramQuantizer`` for ``config`` (``targets``: what the quantization stage converted and
    skipped), its config, the save hooks, and the run-time stages."""
    quantizer = HfVramQuantizer(config, pre_quantized=False)
    quantizer.plan = targets
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "config"):
        model.config.quantization_config = config
    install_save_hooks(model)
    pipeline.finish(model, config)
    return model
