"""The calibration text of calibrated quantization (AWQ scales, GPTQ): token windows of CPython's pydoc topics.

The methods themselves live in ``awq.py`` and ``gptq.py``, run block by block by ``sequential.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def default_calibration_ids(model: nn.Module, n_windows: int, window: int = 512) -> torch.Tensor:
    """``[n_windows, window]`` token ids of CPython's pydoc text, tokenized with the model's own tokenizer."""
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text
    from hf_vram.data import calibration_ids

    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"hf_vram: calibration needs the model's tokenizer, and none was found at {source!r}; pass token ids "
            "to hf_vram.optimize(model, config, calibration_ids=hf_vram.calibration_ids(tokenizer, texts, n, window)), "
            "or choose data-free settings (quantization.calibration: none, pruning.method: magnitude or random)."
        ) from err
    # Calibrate on the end of the text: the benchmarks score perplexity on its beginning.
    return calibration_ids(tokenizer, pydoc_text(), n_windows, window, from_end=True)
