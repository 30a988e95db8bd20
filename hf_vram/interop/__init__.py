"""Formats other tools read and write: hf_vram models leave through ``export`` and come back through the loaders.

One format today, ``compressed-tensors`` (``interop.compressed_tensors``): what llm-compressor writes, vLLM and
SGLang serve, and Transformers loads without hf_vram. This room sits above the pipeline and the Transformers door:
it reads layers only through their public saved-layout methods (``saved_tensors``, ``row_slice``) and builds
them through ``quant.build``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from hf_vram.interop.compressed_tensors import (
    FORMAT,
    ExportError,
    ExportReport,
    convert_compressed_model,
    export_compressed_tensors,
    load_compressed_tensors,
)

FORMATS = (FORMAT,)


def export(
    model: nn.Module,
    folder: str | Path,
    format: str = "compressed-tensors",
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> ExportReport:
    """Write ``model`` to ``folder`` in ``format``; refuses by name (``ExportError``, nothing written) what the
    format cannot express. Returns what was written, how long it took and what changed on the way."""
    if format not in FORMATS:
        raise ValueError(f"hf_vram export: format {format!r} is not supported; supported: {', '.join(FORMATS)}.")
    if getattr(model, "hf_quantizer", None) is None or getattr(model, "quantization_method", None) != "hf_vram":
        raise ValueError(
            "hf_vram export: the model is not an hf_vram model; load it with an hf_vram config (or hf_vram.optimize it) first."
        )
    return export_compressed_tensors(model, folder, tokenizer=tokenizer, dtype=dtype)


__all__ = ["FORMATS", "ExportError", "ExportReport", "convert_compressed_model", "export", "load_compressed_tensors"]
