"""Fusion: one-pass norms, one-matmul projections, and an O(n)-memory attention registered with Transformers.

Names load on first use: ``hf_vram.fusion.attention`` is imported while Transformers itself is still importing model
code (``hf_vram.hf.registration``), when this package must not import anything that needs a model class.
"""

from hf_vram._lazy import lazy_getattr

__getattr__ = lazy_getattr(
    __name__, {"FusionReport": ".apply", "fuse_model": ".apply", "FusedRMSNorm": ".norms", "ProjectionSlice": ".projections"}
)


__all__ = ["FusedRMSNorm", "FusionReport", "ProjectionSlice", "fuse_model"]
