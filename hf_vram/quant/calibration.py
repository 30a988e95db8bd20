"""Activation-aware scales (AWQ for weight-only schemes, SmoothQuant for W8A8), from a few windows of text.

For each linear layer, inputs are recorded while calibration text runs through the float model. The layer then
tries ``s = mean|x|^alpha`` for alpha in ``ALPHAS`` (normalised so that max * min = 1), quantizes ``W * s``
with the layer's own scheme, and keeps the alpha whose simulated output on ``x / s`` (``layer.simulate``: for
W8A8 this quantizes the scaled activations too, which is what moves outliers from activations into weights) is
closest to ``x @ W.T`` on the recorded inputs. Alpha 0 is plain quantization, so on the calibration inputs
calibration never does worse than none.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ALPHAS = tuple(i / 10 for i in range(11))
ROWS_PER_LAYER = 512


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


@torch.no_grad()
def record_inputs(model: nn.Module, names: list[str], ids: torch.Tensor, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Up to ``ROWS_PER_LAYER`` input rows per named layer (evenly strided), float32."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_batch = max(1, ROWS_PER_LAYER // max(1, -(-ids.shape[0] // batch_size)))
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            step = max(1, x.shape[0] // per_batch)
            rows[name].append(x[::step][:per_batch].cpu())

        hooks.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i : i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@torch.no_grad()
def search_scales(layer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The best per-input-channel scale for one layer (``layer`` supplies the scheme's quantize/dequantize)."""
    w = weight.detach().float()
    target = x @ w.t()
    mean_abs = x.abs().mean(0).clamp(min=1e-6)
    best, best_err = None, float("inf")
    for alpha in ALPHAS:
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        tensors = layer._quantize(w * s[None, :])
        err = (layer.simulate(x / s[None, :], tensors) - target).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best
