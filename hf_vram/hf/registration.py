"""Register hf_vram's config and quantizer with Transformers, once per process (notebook re-runs included)."""

from __future__ import annotations

from transformers.quantizers import auto as quantizer_auto
from transformers.quantizers import register_quantization_config, register_quantizer

from hf_vram.config import QUANT_METHOD, VramOptimizationConfig
from hf_vram.hf.quantizer import HfVramQuantizer


def register() -> None:
    """Idempotent: Transformers' decorators raise on a second registration, so look before registering.

    A re-imported module (``importlib.reload``) brings new class objects; the mapping is then pointed at them.
    """
    if QUANT_METHOD in quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = VramOptimizationConfig
    else:
        register_quantization_config(QUANT_METHOD)(VramOptimizationConfig)
    if QUANT_METHOD in quantizer_auto.AUTO_QUANTIZER_MAPPING:
        quantizer_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HfVramQuantizer
    else:
        register_quantizer(QUANT_METHOD)(HfVramQuantizer)
