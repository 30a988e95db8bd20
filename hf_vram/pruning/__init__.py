"""Structured pruning: GQA-aware attention heads, MLP channels, and weight sparsity with honest bytes."""

from hf_vram.pruning.plan import LayerHeads, PruningPlan
from hf_vram.pruning.prune import build_pruned_skeleton, prune_model
from hf_vram.pruning.scores import METHODS, compute_scores
from hf_vram.pruning.sparsity import BlockSparseLinear, sparsity_report
from hf_vram.pruning.surgery import applied_plan, apply_plan

__all__ = [
    "METHODS",
    "BlockSparseLinear",
    "LayerHeads",
    "PruningPlan",
    "applied_plan",
    "apply_plan",
    "build_pruned_skeleton",
    "compute_scores",
    "prune_model",
    "sparsity_report",
]
