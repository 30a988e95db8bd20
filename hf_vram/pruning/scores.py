"""Importance of every attention head and MLP channel, from a few windows of calibration text.

A head's (or channel's) contribution enters the residual stream through the columns of the output projection
(o_proj / down_proj) it feeds, so every score looks at that projection's input ``x`` and columns ``W[:, c]``:

- ``taylor``: first-order Taylor estimate of the loss change when the unit's input is zeroed, per sequence
  ``|sum_t sum_c x_tc * dL/dx_tc|``, summed over sequences (LLM-Pruner's element-wise first order).
- ``activation``: ``sum_c ||W[:, c]|| * ||x_c||`` over calibration tokens (Wanda's weight-times-activation
  norm, at the unit's granularity); no backward pass.
- ``magnitude``: ``sum_c ||W[:, c]||``; no data.
- ``random``: a seeded random baseline.

Head counts are allocated across layers by comparing scores (see ``selection``). Taylor scores are loss changes,
comparable between layers; activation and magnitude scores are not (their scale differs from layer to layer), so
each is divided by its layer's mean and layers compare by the relative importance of their heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from hf_vram.pruning.sites import attention_sites, in_features, mlp_sites

METHODS = ("taylor", "activation", "magnitude", "random")


@dataclass
class Scores:
    heads: dict[int, torch.Tensor]  # layer -> [current num_heads]
    channels: dict[int, torch.Tensor]  # layer -> [current channels]


def _column_norms(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().float()
    return w.norm(dim=1) if isinstance(layer, Conv1D) else w.norm(dim=0)


class _Recorder:
    """Accumulates per-column statistics of one output projection's input across calibration batches."""

    def __init__(self, layer: nn.Module, need_grad: bool) -> None:
        self.sq = torch.zeros(in_features(layer))
        self.taylor_per_col: list[torch.Tensor] = []
        self.need_grad = need_grad
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0]
        self.sq += x.detach().float().pow(2).flatten(0, -2).sum(0).cpu()
        if self.need_grad and x.requires_grad:
            value = x.detach()
            x.register_hook(lambda g: self.taylor_per_col.append((value.float() * g.float()).sum(1).cpu()))

    def taylor(self, unit: int) -> torch.Tensor:
        """``|sum over tokens and the unit's columns of x * grad|`` per sequence, summed over sequences."""
        total = torch.zeros(self.sq.numel() // unit)
        for per_col in self.taylor_per_col:  # [batch, columns]
            total += per_col.view(per_col.shape[0], -1, unit).sum(-1).abs().sum(0)
        return total


def _per_layer(scores: torch.Tensor) -> torch.Tensor:
    """Scale-free scores: divided by the layer's mean, so layers compare by relative importance."""
    return scores / scores.mean().clamp_min(1e-30)


def compute_scores(
    model: nn.Module,
    method: str,
    calibration_ids: torch.Tensor | None,
    *,
    heads: bool = True,
    channels: bool = True,
    batch_size: int = 2,
    seed: int = 0,
) -> Scores:
    """Score the current (possibly already pruned) model's heads and channels with ``method``."""
    if method not in METHODS:
        raise ValueError(f"hf_vram pruning: method={method!r} is invalid; allowed: {', '.join(METHODS)}.")
    attn = attention_sites(model) if heads else []
    mlps = mlp_sites(model) if channels else []
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return Scores(
            {s.layer: torch.rand(s.num_heads, generator=gen) for s in attn},
            {s.layer: torch.rand(s.channels, generator=gen) for s in mlps},
        )
    if method == "magnitude":
        return Scores(
            {s.layer: _per_layer(_column_norms(s.proj["o"]).view(s.num_heads, -1).sum(1)) for s in attn},
            {s.layer: _column_norms(s.down) for s in mlps},
        )
    if calibration_ids is None:
        raise ValueError(f"hf_vram pruning: method {method!r} needs calibration token ids.")
    need_grad = method == "taylor"
    head_rec = {s.layer: _Recorder(s.proj["o"], need_grad) for s in attn}
    mlp_rec = {s.layer: _Recorder(s.down, need_grad) for s in mlps}
    handles = [r.handle for r in (*head_rec.values(), *mlp_rec.values())]
    if need_grad:  # gradients reach the activations without allocating a gradient for any weight
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        model.eval()
        for start in range(0, calibration_ids.shape[0], batch_size):
            batch = calibration_ids[start : start + batch_size].to(next(model.parameters()).device)
            with torch.set_grad_enabled(need_grad):
                out = model(input_ids=batch, labels=batch if need_grad else None, use_cache=False)
                if need_grad:
                    out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    if need_grad:
        head_scores = {s.layer: head_rec[s.layer].taylor(s.head_dim) for s in attn}
        chan_scores = {s.layer: mlp_rec[s.layer].taylor(1) for s in mlps}
    else:
        head_scores = {
            s.layer: _per_layer((_column_norms(s.proj["o"]) * head_rec[s.layer].sq.sqrt()).view(s.num_heads, -1).sum(1))
            for s in attn
        }
        chan_scores = {s.layer: _column_norms(s.down) * mlp_rec[s.layer].sq.sqrt() for s in mlps}
    return Scores(head_scores, chan_scores)
