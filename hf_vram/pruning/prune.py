"""``prune_model``: score, select and cut, in one or several steps; the pipeline's pruning stage.

Progressive pruning (``steps`` > 1) removes ``ratio * k / steps`` of the original heads and channels by step
``k`` and re-scores the smaller model between steps; ``on_step`` is called after each cut, which is where the
recovery callbacks train before the next scoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from hf_vram.config import PruningSection
from hf_vram.data import default_calibration_ids
from hf_vram.pruning.plan import PruningPlan
from hf_vram.pruning.scores import compute_scores
from hf_vram.pruning.selection import select
from hf_vram.pruning.sites import attention_sites, check_supported, mlp_sites
from hf_vram.pruning.sparsity import block_sparse_skeleton, sparsify
from hf_vram.pruning.surgery import applied_plan, apply_plan

logger = logging.getLogger("hf_vram")


def _scaled(ratio: float | dict, fraction: float) -> float | dict:
    if isinstance(ratio, dict):
        return {k: v * fraction for k, v in ratio.items()}
    return ratio * fraction


def _any(ratio: float | dict) -> bool:
    return any(v > 0 for v in ratio.values()) if isinstance(ratio, dict) else ratio > 0


def default_pruning_ids(model: nn.Module, section: PruningSection) -> torch.Tensor:
    return default_calibration_ids(model, section.calibration_samples, section.calibration_length)


def sparsity_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The projections of every attention and MLP site, by module name."""
    targets = {}
    for s in attention_sites(model):
        targets.update({name: s.proj[role] for role, name in s.proj_names.items()})
    for s in mlp_sites(model):
        targets.update(dict(zip(s.up_names, s.up, strict=True)))
        targets[s.down_name] = s.down
    return targets


def prune_step(
    model: nn.Module, section: PruningSection, calibration_ids: torch.Tensor | None, fraction: float, step: int = 1
) -> PruningPlan:
    """Re-score the model as it is now and cut it to ``fraction`` of the section's target ratios (cumulative)."""
    heads, channels = _any(section.head_ratio), _any(section.mlp_ratio)
    plan = applied_plan(model)
    if not (heads or channels):
        return plan
    scores = compute_scores(model, section.method, calibration_ids, heads=heads, channels=channels, seed=section.seed + step)
    plan = select(
        plan,
        scores,
        _scaled(section.head_ratio, fraction),
        _scaled(section.mlp_ratio, fraction),
        section.min_heads_per_layer,
    )
    apply_plan(model, plan)
    return plan


def prune_model(
    model: nn.Module,
    section: PruningSection,
    calibration_ids: torch.Tensor | None = None,
    on_step: Callable[[nn.Module, PruningPlan, int], None] | None = None,
) -> PruningPlan:
    """Prune ``model`` in place as ``section`` says; returns the plan, also recorded in ``section.state.pruning_plan``."""
    heads, channels = _any(section.head_ratio), _any(section.mlp_ratio)
    check_supported(model, heads, channels)
    start = time.perf_counter()
    if section.plan is not None:
        plan = PruningPlan.from_dict(section.plan)
        apply_plan(model, plan)
    else:
        plan = applied_plan(model)
        if section.method in ("taylor", "activation") and (heads or channels) and calibration_ids is None:
            calibration_ids = default_pruning_ids(model, section)
        for step in range(1, section.steps + 1):
            plan = prune_step(model, section, calibration_ids, step / section.steps, step)
            if on_step is not None:
                on_step(model, plan, step)
    plan_dict = plan.to_dict()
    if section.sparsity != "none" and section.sparsity_ratio > 0:  # deterministic given the weights
        plan_dict["block_sparse"] = sparsify(model, sparsity_targets(model), section.sparsity, section.sparsity_ratio)
    section.state.pruning_plan = plan_dict
    logger.info("hf_vram: pruned %s in %.1f s", plan.summary(), time.perf_counter() - start)
    return plan


def build_pruned_skeleton(model: nn.Module, section: PruningSection) -> None:
    """Shrink a meta model to a saved plan (and its block-sparse layers) before the pruned weights load."""
    if section.plan is None:
        raise ValueError(
            "hf_vram pruning: this checkpoint's config enables pruning but carries no plan, so the pruned shapes "
            "cannot be rebuilt; the checkpoint is incomplete. Re-save it from the pruned model."
        )
    apply_plan(model, PruningPlan.from_dict(section.plan))
    block_sparse_skeleton(model, section.plan.get("block_sparse", {}))
