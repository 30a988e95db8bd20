"""What hf_vram decided while carrying out a config, kept apart from what the user asked.

The sections of a ``VramOptimizationConfig`` hold the user's settings. The stages record their decisions here: the
layers that keep run-time activation scales after calibration, the storage dtype of imported int4 scales, the
per-layer schemes the budget planner or an import chose, the pruning plan (kept heads and channels), and the
planner's summary. It is saved beside the sections (``quantization_config["state"]`` in config.json), so a saved
model reloads exactly what was built; the doors work on a copy of the user's config, so the user's object never
changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class OptimizationState:
    act_scale_layers: list[str] | None = None  # calibration: layers dividing their input at run time (None: all)
    scale_dtype: str = "bfloat16"  # int4 scale storage; float32 for an import whose scales bfloat16 cannot hold
    layer_schemes: dict[str, str] | None = None  # per-layer schemes chosen by the planner or an import
    pruning_plan: dict | None = None  # kept heads, removed channels, sparse blocks per layer (``PruningPlan``)
    budget: dict | None = None  # the planner's summary (``BudgetPlan.as_dict``)

    # keys of format-1 checkpoints, which kept these inside the sections: (section, key) -> state field
    LEGACY_KEYS = {
        ("quantization", "act_scale_layers"): "act_scale_layers",
        ("quantization", "scale_dtype"): "scale_dtype",
        ("pruning", "plan"): "pruning_plan",
        ("planner", "plan"): "budget",
    }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OptimizationState:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hf_vram config: unknown key(s) {unknown} in 'state' (written by hf_vram); known: {sorted(known)}.")
        if data.get("scale_dtype", "bfloat16") not in ("bfloat16", "float32"):
            raise ValueError(
                f"hf_vram config: state.scale_dtype={data['scale_dtype']!r} is invalid; allowed: 'bfloat16', 'float32'."
            )
        return cls(**data)

    @classmethod
    def take_legacy(cls, sections: dict[str, Any]) -> dict[str, Any]:
        """Move format-1 keys out of the (dict) sections into a state dict."""
        found = {}
        for (section, key), field_name in cls.LEGACY_KEYS.items():
            value = sections.get(section)
            if isinstance(value, dict) and key in value:
                value = dict(value)
                found[field_name] = value.pop(key)
                sections[section] = value
        if found.get("scale_dtype") is None:
            found.pop("scale_dtype", None)
        return found
