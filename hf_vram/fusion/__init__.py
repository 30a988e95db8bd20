"""Fusion: one-pass norms, one-matmul projections, and an O(n)-memory attention registered with Transformers.

Names load on first use: ``hf_vram.fusion.attention`` is imported while Transformers itself is still importing model
code (``hf_vram.hf.registration``), when this package must not import anything that needs a model class.
"""

import importlib

_SOURCES = {
    "FusionReport": "apply",
    "fuse_model": "apply",
    "FusedRMSNorm": "norms",
    "ProjectionSlice": "projections",
}


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(f"hf_vram.fusion.{_SOURCES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_vram.fusion' has no attribute {name!r}")


__all__ = ["FusedRMSNorm", "FusionReport", "ProjectionSlice", "fuse_model"]
