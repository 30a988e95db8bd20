"""``hf_vram.optimize``: the in-memory door, above the pipeline, the Transformers door and the interop formats.

``from_pretrained(path, quantization_config=config)`` is the other door (``hf_vram.hf.quantizer``); both run
``hf_vram.pipeline``, so they cannot drift apart.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from hf_vram import pipeline
from hf_vram.config import VramOptimizationConfig, as_config
from hf_vram.hf.attach import attach
from hf_vram.interop.compressed_tensors import convert_compressed_model


def optimize(
    model: nn.Module, config: VramOptimizationConfig | dict | str, calibration_ids: torch.Tensor | None = None
) -> nn.Module:
    """Apply ``config`` to a model already in memory (e.g. one loaded from GGUF), in place; returns the model.

    A model Transformers loaded from a compressed-tensors checkpoint keeps its quantized weights: they are converted
    to hf_vram's layers bit for bit (``hf_vram.interop.compressed_tensors``), never through float.

    ``config`` may be a ``VramOptimizationConfig``, a dict of sections, or a preset name / YAML path.
    ``calibration_ids`` (``[n, seq]`` token ids) feed pruning scores and calibrated quantization; by default they
    tokenize CPython's pydoc text with the model's tokenizer. The model then saves with ``save_pretrained`` and
    reloads with plain ``from_pretrained`` after ``import hf_vram``. The config as carried out (with hf_vram's
    decisions in its ``state``) is ``model.config.quantization_config``; the ``config`` passed in is not changed.
    """
    config = copy.deepcopy(as_config(config))  # the plan as carried out is the model's; the caller's stays as given
    if config.quantization.enabled and config.quantization.backend == "bitsandbytes":
        raise NotImplementedError(
            "hf_vram: backend 'bitsandbytes' quantizes while weights load; use from_pretrained(path, "
            "quantization_config=config) (save this model first if it only exists in memory)."
        )
    if getattr(model, "hf_quantizer", None) is not None:
        method = str(getattr(model, "quantization_method", "another method"))
        if method.removeprefix("QuantizationMethod.").lower().replace("_", "-") != "compressed-tensors":
            raise ValueError(f"hf_vram: this model is already quantized ({method}); optimize the float model instead.")
        # A compressed-tensors checkpoint (llm-compressor's GPTQ/AWQ, vLLM's format): its codes become hf_vram's
        # layers as they are; the remaining stages then run on what is still float (the embedding, norms, attention).
        model.hf_quantizer = None
        convert_compressed_model(model, config)
    return attach(model, config, pipeline.apply(model, config, calibration_ids))
