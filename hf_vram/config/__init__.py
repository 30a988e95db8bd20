"""The hf_vram plan: ``VramOptimizationConfig``, its technique sections, and the state hf_vram records beside them.

A config is a plan, not an action: it is validated when built (a bad value raises ``ValueError`` naming the
field, the value and what is allowed), it round-trips exactly through ``to_dict``/``from_dict`` (config.json)
and ``to_yaml``/``from_yaml``, and one pipeline (``hf_vram.pipeline``) carries it out. Its sections hold what the
user asked (``sections``); what hf_vram decides while carrying it out is its ``state`` (``state``), saved beside
the sections.

This package imports nothing of hf_vram's but the presets and nothing heavier than Transformers' config base, so
that a config can be read, checked and written without loading torch modules of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_vram.config.checks import parse_bytes
from hf_vram.config.sections import (
    SECTIONS,
    FusionSection,
    KVCacheSection,
    PlannerSection,
    PruningSection,
    QuantizationSection,
    RecoverySection,
    Section,
)
from hf_vram.config.state import OptimizationState
from hf_vram.presets import preset_path

QUANT_METHOD = "hf_vram"
# Bumped when what a saved model holds changes; a checkpoint from a newer format is refused.
# 1: the first layout; 2: hf_vram's decisions moved out of the sections into "state" (format 1 still loads).
FORMAT_VERSION = 2


class VramOptimizationConfig(QuantizationConfigMixin):
    """The whole hf_vram plan, usable as ``from_pretrained(..., quantization_config=VramOptimizationConfig(...))``.

    Each section may be given as its dataclass or as a plain dict, e.g.
    ``VramOptimizationConfig(quantization={"scheme": "int4", "group_size": 128})``; each section's fields document
    themselves (``QuantizationSection.help()``).
    """

    def __init__(
        self,
        quantization: QuantizationSection | dict | None = None,
        fusion: FusionSection | dict | None = None,
        pruning: PruningSection | dict | None = None,
        kv_cache: KVCacheSection | dict | None = None,
        recovery: RecoverySection | dict | None = None,
        planner: PlannerSection | dict | None = None,
        target_memory: int | str | None = None,
        state: OptimizationState | dict | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"hf_vram config: quant_method={quant_method!r} is invalid; allowed: {QUANT_METHOD!r}.")
        if kwargs:
            raise ValueError(f"hf_vram config: unknown section(s) {sorted(kwargs)}; known sections: {sorted(SECTIONS)}.")
        if not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"hf_vram config: format_version={format_version!r} is invalid; allowed: an integer >= 1.")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"hf_vram config: this model was saved by a newer hf_vram (format {format_version}, this install "
                f"reads up to {FORMAT_VERSION}). Upgrade with `pip install -U hf-vram`."
            )
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        given = {
            "quantization": quantization,
            "fusion": fusion,
            "pruning": pruning,
            "kv_cache": kv_cache,
            "recovery": recovery,
            "planner": planner,
        }
        legacy = OptimizationState.take_legacy(given)  # format 1 kept hf_vram's decisions inside the sections
        if isinstance(state, OptimizationState):
            self.state = state
        else:
            self.state = OptimizationState.from_dict({**legacy, **(state or {})})
        for name, value in given.items():
            cls = SECTIONS[name]
            if isinstance(value, cls):
                value.validate()
                section = value
            elif value is None or isinstance(value, dict):
                section = cls.from_dict(value)
            else:
                raise ValueError(
                    f"hf_vram config: section '{name}' is a {type(value).__name__}; allowed: a dict or {cls.__name__}."
                )
            setattr(self, name, section)
        if target_memory is not None:  # the one-argument door to the planner
            self.planner.target_memory = parse_bytes(target_memory, "target_memory")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if isinstance(value, Section):  # every section records its decisions in this config's state
            value.state = self.state

    @property
    def target_memory(self) -> int | None:
        return self.planner.target_memory

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": self.format_version}
        for name in SECTIONS:
            out[name] = getattr(self, name).to_dict()
        out["state"] = self.state.to_dict()
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VramOptimizationConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:  # configs are mutable plans; identity hash like QuantizationConfigMixin
        return id(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The user's settings as YAML (hf_vram's state is saved with models, not in presets)."""
        data = self.to_dict()
        del data["quant_method"], data["state"]
        text = yaml.safe_dump(data, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> VramOptimizationConfig:
        """Read a YAML file (or YAML text); comments are allowed, unknown keys are errors."""
        source = str(path_or_text)
        path = Path(source)
        is_file = "\n" not in source and path.suffix in (".yaml", ".yml")
        if is_file and not path.is_file():
            raise FileNotFoundError(f"hf_vram config: no YAML file at {path}; presets load by name (from_preset).")
        text = path.read_text() if is_file else source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"hf_vram config: invalid YAML in {source if is_file else 'the given text'}: {err}") from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"hf_vram config: the YAML must be a mapping of sections, got {type(data).__name__}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str) -> VramOptimizationConfig:
        """Load a preset shipped inside the package (``hf_vram/presets/``) by name (e.g. ``"int8"``)."""
        return cls.from_yaml(preset_path(name))

    @property
    def enabled_sections(self) -> list[str]:
        return [name for name in SECTIONS if getattr(getattr(self, name), "enabled", False)]


def as_config(config: VramOptimizationConfig | dict | str) -> VramOptimizationConfig:
    """A ``VramOptimizationConfig`` from one, a dict of sections, a preset name, a YAML path or YAML text."""
    if isinstance(config, VramOptimizationConfig):
        return config
    if isinstance(config, dict):
        return VramOptimizationConfig(**config)
    if isinstance(config, str):
        if config.endswith((".yaml", ".yml")) or "\n" in config:
            return VramOptimizationConfig.from_yaml(config)
        return VramOptimizationConfig.from_preset(config)
    raise TypeError(f"hf_vram: expected a VramOptimizationConfig, dict, preset name or YAML path, got {type(config)}")


def kv_cache_section(model_config: Any) -> KVCacheSection | None:
    """The ``kv_cache`` section of a Transformers model config's hf_vram quantization config (saved as a dict or
    live), or None for a model hf_vram did not build: what the cache and K/V readers take their settings from."""
    quant = getattr(model_config, "quantization_config", None)
    if isinstance(quant, dict):
        if quant.get("quant_method") != QUANT_METHOD:
            return None
        quant = VramOptimizationConfig(**quant)
    return getattr(quant, "kv_cache", None) if getattr(quant, "quant_method", None) == QUANT_METHOD else None


__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "FusionSection",
    "KVCacheSection",
    "OptimizationState",
    "PlannerSection",
    "PruningSection",
    "QuantizationSection",
    "RecoverySection",
    "VramOptimizationConfig",
    "as_config",
    "kv_cache_section",
    "parse_bytes",
]
