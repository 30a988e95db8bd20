"""The hf_vram plan: ``VramOptimizationConfig`` and its technique sections.

A config is a plan, not an action: it is validated when built (a bad value raises ``ValueError`` naming the
field, the value and what is allowed), it round-trips exactly through ``to_dict``/``from_dict`` (config.json)
and ``to_yaml``/``from_yaml``, and one pipeline (``hf_vram.pipeline``) carries it out.

This module imports nothing of hf_vram's and nothing heavier than Transformers' config base, so that a config
can be read, checked and written without loading torch modules of ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_vram.presets import preset_path

QUANT_METHOD = "hf_vram"
# Bumped when the saved layout of a quantized model changes; a checkpoint from a newer format is refused.
FORMAT_VERSION = 1

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"hf_vram config: {section}.{name}={value!r} is invalid; allowed: {allowed}.")


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(section, name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(section, name, value, "true or false")


def _check_ratio(section: str, name: str, value: Any, *, upper_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        _fail(section, name, value, "a number in [0, 1]" if upper_inclusive else "a number in [0, 1)")


def _check_positive_int(section: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(section, name, value, "a positive integer" + (" or null" if allow_none else ""))


@dataclass
class _Section:
    """Shared behaviour of the technique sections: validation on build, dict round trip."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - every section overrides it
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> _Section:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hf_vram config: unknown key(s) {unknown} in section '{cls.name}'; known keys: {sorted(known)}.")
        if data and "enabled" in known and "enabled" not in data:
            data["enabled"] = True  # a section the user writes out is a section the user wants; `enabled: false` opts out
        return cls(**data)


@dataclass
class QuantizationSection(_Section):
    """Low-bit linear layers (and optionally the embedding).

    scheme: ``none``; ``int8`` (weight-only, symmetric, per output channel); ``int4`` (weight-only,
    group-wise, two values per byte); ``w8a8`` (int8 weights and per-token dynamic int8 activations).
    ``backend="bitsandbytes"`` hands ``int8`` (LLM.int8) and ``nf4`` to bitsandbytes for users who want its format.
    group_size: int4 group along the input dimension. When it does not divide a layer's input size, the input
    dimension is zero-padded to a multiple of the group (the pad columns quantize to exact zeros), so every group
    really holds ``group_size`` weights: quality is never flattered by a silently smaller group.
    scale_search: ``clip`` chooses each int4 group's range from a grid of clipping ratios to minimise the
    squared weight error (no calibration data); ``none`` uses plain min/max.
    quantize_embeddings: also store the input embedding as int8 per row; a tied output head then reads the same
    int8 storage.
    modules_to_not_convert: exact module names, dotted suffixes or regexes (full match); each must match at least
    one module, and what matched is reported.
    layer_schemes: per-layer overrides ``{exact module name: scheme}`` (``none`` keeps a layer in float); the
    budget planner writes them, so a saved model reloads with the same mix.
    calibration: quantization that reads ``calibration_samples`` 512-token windows of text, one decoder block at a
    time (``hf_vram.quant.sequential``): ``awq`` gives each group of layers reading one input a per-channel scale
    ``s = mean|x|^alpha`` (alpha searched to minimise the group's output error) and folds ``1 / s`` into the norm
    or projection that produces that input (``hf_vram.quant.awq``; layers where that is impossible divide their
    input at run time, listed in ``act_scale_layers``); ``gptq`` rounds each layer column by column with GPTQ's
    second-order error compensation (``hf_vram.quant.gptq``: ``act_order``, ``dampening``); ``awq+gptq`` does
    both, GPTQ on the AWQ-scaled weights. They need the float model in memory: through ``from_pretrained`` the
    weights load in float first, then quantize. The text is CPython's pydoc topics (offline, its last tokens, so
    it never overlaps the benchmarks' evaluation text) unless ``hf_vram.optimize`` is given other token ids.
    act_order: GPTQ quantizes columns by decreasing activation energy (groups stay static, the layout unchanged).
    dampening: GPTQ adds ``dampening * mean(diag(H))`` to its Hessian's diagonal.
    act_scale_layers: written by hf_vram after calibration: the layers that keep run-time activation scales (None
    in checkpoints written before scales were folded: every layer of a calibrated config then has them).
    scale_dtype: how int4 scales and zeros are stored: ``bfloat16``, or ``float32`` for a checkpoint imported from
    compressed-tensors whose scales bfloat16 cannot hold exactly (``hf_vram.optimize`` sets it).
    compute_dtype: activation dtype of quantized matmuls; ``auto`` picks bfloat16 for the packed CPU kernels and
    the model's dtype elsewhere.
    """

    name: ClassVar[str] = "quantization"
    scheme: str = "none"
    backend: str = "hf_vram"
    group_size: int = 128
    symmetric: bool = False
    scale_search: str = "clip"
    quantize_embeddings: bool = False
    modules_to_not_convert: list[str] | None = None
    compute_dtype: str = "auto"
    calibration: str = "none"
    calibration_samples: int = 8
    act_order: bool = True
    dampening: float = 0.01
    layer_schemes: dict[str, str] | None = None  # exact module name -> scheme (the budget planner writes it)
    act_scale_layers: list[str] | None = None  # written after calibration: layers dividing their input at run time
    scale_dtype: str = "bfloat16"

    CALIBRATIONS: ClassVar[tuple] = ("none", "awq", "gptq", "awq+gptq")

    SCHEMES: ClassVar[tuple] = ("none", "int8", "int4", "w8a8", "nf4")
    LAYER_SCHEMES: ClassVar[tuple] = ("none", "int8", "int4", "w8a8")

    def scheme_for(self, module_name: str) -> str:
        """The scheme of one linear layer: its ``layer_schemes`` entry, else the section's ``scheme``."""
        return (self.layer_schemes or {}).get(module_name, self.scheme)

    def has_act_scales(self, module_name: str) -> bool:
        """Whether a quantized layer divides its input by saved activation scales at run time."""
        if self.calibration == "none":
            return False
        return self.act_scale_layers is None or module_name in self.act_scale_layers

    BACKENDS: ClassVar[tuple] = ("hf_vram", "bitsandbytes")

    def validate(self) -> None:
        s = self.name
        _check_choice(s, "scheme", self.scheme, self.SCHEMES)
        _check_choice(s, "backend", self.backend, self.BACKENDS)
        layers = self.layer_schemes
        if layers is not None:
            if not isinstance(layers, dict) or not all(isinstance(k, str) and k for k in layers):
                _fail(s, "layer_schemes", layers, "a mapping {module name: scheme}")
            for name, scheme in layers.items():
                if scheme not in self.LAYER_SCHEMES:
                    _fail(s, f"layer_schemes[{name!r}]", scheme, "one of " + ", ".join(map(repr, self.LAYER_SCHEMES)))
            if self.backend != "hf_vram" and layers:
                _fail(s, "layer_schemes", layers, "null with backend 'bitsandbytes' (per-layer schemes are hf_vram's)")
        if self.backend == "hf_vram" and self.scheme == "nf4":
            _fail(s, "scheme", self.scheme, "'nf4' only with backend='bitsandbytes'")
        if self.backend == "bitsandbytes" and self.scheme not in ("none", "int8", "nf4"):
            _fail(s, "scheme", self.scheme, "'int8' or 'nf4' with backend='bitsandbytes'")
        if (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or self.group_size
            not in (
                32,
                64,
                128,
                256,
            )
        ):
            _fail(s, "group_size", self.group_size, "32, 64, 128 or 256")
        _check_bool(s, "symmetric", self.symmetric)
        _check_choice(s, "scale_search", self.scale_search, ("none", "clip"))
        _check_bool(s, "quantize_embeddings", self.quantize_embeddings)
        _check_choice(s, "compute_dtype", self.compute_dtype, _DTYPES)
        _check_choice(s, "calibration", self.calibration, self.CALIBRATIONS)
        _check_positive_int(s, "calibration_samples", self.calibration_samples)
        _check_bool(s, "act_order", self.act_order)
        d = self.dampening
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d) or not 0 < d < 1:
            _fail(s, "dampening", d, "a number in (0, 1), e.g. 0.01")
        _check_choice(s, "scale_dtype", self.scale_dtype, ("bfloat16", "float32"))
        names = self.act_scale_layers
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
            _fail(s, "act_scale_layers", names, "null or a list of module names (hf_vram writes it)")
        skip = self.modules_to_not_convert
        if skip is not None:
            if not isinstance(skip, list) or not all(isinstance(p, str) and p for p in skip):
                _fail(s, "modules_to_not_convert", skip, "a list of non-empty module names, suffixes or regexes")
            for pattern in skip:
                try:
                    re.compile(pattern)
                except re.error as err:
                    _fail(s, "modules_to_not_convert", pattern, f"a valid regular expression ({err})")

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"


@dataclass
class FusionSection(_Section):
    """Fused norms, projections and attention (issue 4)."""

    name: ClassVar[str] = "fusion"
    enabled: bool = False
    norms: bool = True
    projections: bool = True
    attention: str = "hf_vram"

    def validate(self) -> None:
        _check_bool(self.name, "enabled", self.enabled)
        _check_bool(self.name, "norms", self.norms)
        _check_bool(self.name, "projections", self.projections)
        _check_choice(self.name, "attention", self.attention, ("sdpa", "hf_vram", "none"))


@dataclass
class PruningSection(_Section):
    """Structured pruning of attention heads and MLP channels, plus optional weight sparsity (issue 5).

    ``head_ratio``/``mlp_ratio`` are fractions of the original heads/channels to remove: one number for the whole
    model, or a mapping ``{layer_index: ratio}``. ``steps`` > 1 prunes progressively, re-scoring between steps.
    ``plan`` is written by hf_vram after pruning (kept heads, removed channels per layer); a saved model's config
    carries it so that ``from_pretrained`` rebuilds the pruned shapes.
    """

    name: ClassVar[str] = "pruning"
    enabled: bool = False
    head_ratio: float | dict = 0.0
    mlp_ratio: float | dict = 0.0
    method: str = "taylor"
    min_heads_per_layer: int = 1
    calibration_samples: int = 8
    calibration_length: int = 256
    steps: int = 1
    seed: int = 0
    sparsity: str = "none"
    sparsity_ratio: float = 0.0
    plan: dict | None = None

    def validate(self) -> None:
        _check_bool(self.name, "enabled", self.enabled)
        for field_name in ("head_ratio", "mlp_ratio"):
            value = getattr(self, field_name)
            if isinstance(value, dict):
                for layer, ratio in value.items():
                    if not (isinstance(layer, int) and not isinstance(layer, bool)) and not (
                        isinstance(layer, str) and layer.isdigit()
                    ):
                        _fail(self.name, field_name, value, "a mapping of layer index (integer) to ratio")
                    _check_ratio(self.name, f"{field_name}[{layer}]", ratio)
                setattr(self, field_name, {str(k): v for k, v in value.items()})  # as config.json stores it
            else:
                _check_ratio(self.name, field_name, value)
        _check_choice(self.name, "method", self.method, ("taylor", "activation", "magnitude", "random"))
        _check_positive_int(self.name, "min_heads_per_layer", self.min_heads_per_layer)
        _check_positive_int(self.name, "calibration_samples", self.calibration_samples)
        _check_positive_int(self.name, "calibration_length", self.calibration_length)
        _check_positive_int(self.name, "steps", self.steps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            _fail(self.name, "seed", self.seed, "an integer")
        _check_choice(self.name, "sparsity", self.sparsity, ("none", "unstructured", "block16"))
        _check_ratio(self.name, "sparsity_ratio", self.sparsity_ratio)
        if self.plan is not None and not isinstance(self.plan, dict):
            _fail(self.name, "plan", self.plan, "null or a plan mapping written by hf_vram")


@dataclass
class KVCacheSection(_Section):
    """Pooled (paged) KV cache (issue 6)."""

    name: ClassVar[str] = "kv_cache"
    enabled: bool = False
    block_size: int = 16
    num_blocks: int | None = None
    dtype: str = "auto"

    def validate(self) -> None:
        _check_bool(self.name, "enabled", self.enabled)
        _check_positive_int(self.name, "block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            _fail(self.name, "block_size", self.block_size, "a power of two")
        _check_positive_int(self.name, "num_blocks", self.num_blocks, allow_none=True)
        _check_choice(self.name, "dtype", self.dtype, ("auto", "int8", "float32", "bfloat16", "float16"))


@dataclass
class RecoverySection(_Section):
    """Distillation recovery settings used by the Trainer callbacks (issue 7)."""

    name: ClassVar[str] = "recovery"
    enabled: bool = False
    temperature: float = 2.0
    alpha: float = 0.5
    learning_rate: float = 1e-5
    top_k: int = 0  # > 0: cache the teacher's top-k logits on disk in cache_dir (for repeated epochs)
    cache_dir: str | None = None
    lora_rank: int = 16
    lora_alpha: int = 32

    def validate(self) -> None:
        _check_bool(self.name, "enabled", self.enabled)
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            _fail(self.name, "temperature", t, "a finite number > 0")
        _check_ratio(self.name, "alpha", self.alpha, upper_inclusive=True)
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            _fail(self.name, "learning_rate", lr, "a finite number > 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            _fail(self.name, "top_k", self.top_k, "an int >= 0 (0 = full teacher logits every step)")
        if self.top_k and not (isinstance(self.cache_dir, str) and self.cache_dir):
            _fail(self.name, "cache_dir", self.cache_dir, "a directory path when top_k > 0")
        _check_positive_int(self.name, "lora_rank", self.lora_rank)
        _check_positive_int(self.name, "lora_alpha", self.lora_alpha)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, what: str = "planner.target_memory") -> int:
    """``"1.5GB"``/``"600MiB"``/``"64 MB"``/an int of bytes -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)\s*", value.lower())
        if match and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(
        f"hf_vram config: {what}={value!r} is invalid; allowed: a positive byte count or a size such as '1.5GB', "
        "'600MiB' or '64 MB'."
    )


@dataclass
class PlannerSection(_Section):
    """Fit the model into a memory budget (``VramOptimizationConfig(target_memory="...")``).

    The planner measures each linear layer's sensitivity on calibration text (a Fisher-weighted quantization error
    from one backward pass), then chooses per-layer schemes (float/int8/int4), and MLP-channel pruning only when
    int4 everywhere does not fit, so the weights (plus the KV cache of ``context_tokens`` tokens, int8 when that
    is what fits) stay under ``target_memory`` with the least estimated loss. It writes its choices into the
    quantization/pruning/kv_cache sections and a summary into ``plan``; a saved model reloads them as they are.
    """

    name: ClassVar[str] = "planner"
    target_memory: int | str | None = None
    context_tokens: int = 0
    calibration_samples: int = 4
    calibration_length: int = 256
    max_mlp_ratio: float = 0.5
    plan: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.target_memory is not None

    def validate(self) -> None:
        if self.target_memory is not None:
            self.target_memory = parse_bytes(self.target_memory)
        if not isinstance(self.context_tokens, int) or isinstance(self.context_tokens, bool) or self.context_tokens < 0:
            _fail(self.name, "context_tokens", self.context_tokens, "an int >= 0")
        _check_positive_int(self.name, "calibration_samples", self.calibration_samples)
        _check_positive_int(self.name, "calibration_length", self.calibration_length)
        _check_ratio(self.name, "max_mlp_ratio", self.max_mlp_ratio)


SECTIONS: dict[str, type[_Section]] = {
    cls.name: cls for cls in (QuantizationSection, FusionSection, PruningSection, KVCacheSection, RecoverySection, PlannerSection)
}


class VramOptimizationConfig(QuantizationConfigMixin):
    """The whole hf_vram plan, usable as ``from_pretrained(..., quantization_config=VramOptimizationConfig(...))``.

    Each section may be given as its dataclass or as a plain dict, e.g.
    ``VramOptimizationConfig(quantization={"scheme": "int4", "group_size": 128})``.
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
        self.format_version = format_version
        given = {
            "quantization": quantization,
            "fusion": fusion,
            "pruning": pruning,
            "kv_cache": kv_cache,
            "recovery": recovery,
            "planner": planner,
        }
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

    @property
    def target_memory(self) -> int | None:
        return self.planner.target_memory

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": self.format_version}
        for name in SECTIONS:
            out[name] = getattr(self, name).to_dict()
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
        data = self.to_dict()
        del data["quant_method"]
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
        active = []
        for name in SECTIONS:
            section = getattr(self, name)
            if getattr(section, "enabled", False):
                active.append(name)
        return active


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


__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "FusionSection",
    "KVCacheSection",
    "PlannerSection",
    "PruningSection",
    "QuantizationSection",
    "RecoverySection",
    "VramOptimizationConfig",
    "as_config",
    "parse_bytes",
]
