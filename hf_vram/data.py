"""Calibration token windows: from the user's own texts, or by default from CPython's pydoc topics tokenized with
the model's own tokenizer (pruning scores, calibrated quantization and the planner read them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from hf_vram.assets import pydoc_text


def calibration_ids(
    tokenizer, texts: str | Iterable[str], n_windows: int, window: int = 512, *, from_end: bool = False
) -> torch.Tensor:
    """``[n_windows, window]`` token ids from ``texts`` (joined with blank lines), for ``hf_vram.optimize``.

    ``from_end`` takes the last tokens instead of the first (hf_vram calibrates on the end of its default text and
    scores perplexity on the beginning, so the two never overlap).
    """
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    need = n_windows * window
    if ids.numel() < need:
        raise ValueError(
            f"hf_vram: the calibration text has {ids.numel()} tokens, fewer than the {need} asked for "
            f"({n_windows} windows of {window}); pass more text or ask for fewer/shorter windows."
        )
    ids = ids[-need:] if from_end else ids[:need]
    return ids.reshape(n_windows, window)


def default_calibration_ids(model: nn.Module, n_windows: int, window: int = 512) -> torch.Tensor:
    """``[n_windows, window]`` token ids of CPython's pydoc text, tokenized with the model's own tokenizer."""
    from transformers import AutoTokenizer  # the tokenizer stack loads only when calibration needs it

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


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length token windows as a causal-LM training set: each item has input_ids, attention_mask, labels.

    Works with the stock Trainer and its default collator, with no ``datasets`` dependency.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"hf_vram TokenWindows: expected [n_windows, window] token ids, got shape {tuple(ids.shape)}.")
        self.ids = ids.long()

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
