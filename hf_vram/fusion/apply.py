"""The pipeline's fusion stage: swap in fused norms and projections, select the attention implementation.

Runs on a loaded model (``hf_vram.optimize``, or after ``from_pretrained`` loads a float checkpoint) and on the
meta model of a saved fused checkpoint, before its weights load (``qkv_proj``/``gate_up_proj`` are then the
saved tensors). A module this stage would change but cannot reproduce exactly is refused by class name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from hf_vram.config import FusionSection
from hf_vram.fusion.attention import register as register_attention
from hf_vram.fusion.norms import FusedRMSNorm, rms_norm_variant
from hf_vram.fusion.projections import FUSABLE, NATIVE, fuse_projections
from hf_vram.fusion.residual import fuse_residual_adds


@dataclass
class FusionReport:
    norms: int = 0
    native_norms: int = 0
    residual_adds: int = 0
    projections: list[str] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)
    attention: str = "unchanged"


def _attention_classes(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.endswith(("Attention", "SelfAttention"))}


def fuse_model(model: nn.Module, section: FusionSection) -> FusionReport:
    report = FusionReport()
    if section.norms:
        for name, module in list(model.named_modules()):
            cls = type(module).__name__
            if isinstance(module, nn.LayerNorm):
                report.native_norms += 1  # already one fused torch op
            elif cls.endswith("RMSNorm") and not isinstance(module, FusedRMSNorm):
                variant = rms_norm_variant(module)
                if variant is None:
                    raise NotImplementedError(
                        f"hf_vram fusion: {cls} ({name}) computes RMSNorm in a way the fused norm does not reproduce "
                        "exactly; set fusion.norms: false."
                    )
                model.set_submodule(name, FusedRMSNorm.from_module(module, variant))
                report.norms += 1
        report.residual_adds = fuse_residual_adds(model)
    if section.projections:
        unknown = sorted(c for c in _attention_classes(model) if c not in FUSABLE and c not in NATIVE)
        if unknown:
            raise NotImplementedError(
                f"hf_vram fusion: projection fusion does not know the attention module(s) {unknown}; supported: "
                f"{sorted(c for c in FUSABLE if 'Attention' in c)} (and {sorted(NATIVE)} are fused already). "
                "Set fusion.projections: false."
            )
        for name, module in list(model.named_modules()):
            cls = type(module).__name__
            if cls in FUSABLE and not hasattr(module, FUSABLE[cls][1]):
                fuse_projections(module, *FUSABLE[cls])
                report.projections.append(name)
            elif cls in NATIVE:
                report.already_fused.append(name)
    if section.attention != "none":
        register_attention()
        model.set_attn_implementation(section.attention)
        report.attention = section.attention
    return report
