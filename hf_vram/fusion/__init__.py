"""Fusion: one-pass norms, one-matmul projections, and an O(n)-memory attention registered with Transformers."""

from hf_vram.fusion.apply import FusionReport, fuse_model
from hf_vram.fusion.norms import FusedRMSNorm
from hf_vram.fusion.projections import ProjectionSlice

__all__ = ["FusedRMSNorm", "FusionReport", "ProjectionSlice", "fuse_model"]
