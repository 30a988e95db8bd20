"""The technique sections of a ``VramOptimizationConfig``: what the user asks of each technique.

Each setting carries its help and its check on the field itself (``setting``); a section checks every field when
built, then the constraints between fields (``check_together``). A bad value raises ``ValueError`` naming the
section, the field, the value and what is allowed. What hf_vram decides while carrying a section out lives in the
``OptimizationState`` the section is bound to (``state``), not in its fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from hf_vram.config import checks
from hf_vram.config.checks import _WHOLE, Check, Invalid
from hf_vram.config.state import OptimizationState

DTYPES = ("auto", "float32", "bfloat16", "float16")


KEY_GROUP_TOKENS = 64  # hf_vram.kvcache.kivi.GROUP: int4/int2 keys are quantized per channel over this many tokens


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A section field with its help text and validator."""
    return field(default=default, metadata={"help": help, "check": check})


def fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"hf_vram config: {section}.{name}={value!r} is invalid; allowed: {allowed}.")


@dataclass
class Section:
    """Shared behaviour of the technique sections: validation on build, dict round trip, field help."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.state = OptimizationState()  # replaced by the config's own state when the section joins a config
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, f.name)
            try:
                normalised = check(value)
            except Invalid as err:
                fail(self.name, f.name + err.key, value if err.value is _WHOLE else err.value, err.allowed)
            if normalised is not value:
                setattr(self, f.name, normalised)
        self.check_together()

    def check_together(self) -> None:
        """Constraints between fields (after each field passed its own check)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help}``, as documented on the fields."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Section:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hf_vram config: unknown key(s) {unknown} in section '{cls.name}'; known keys: {sorted(known)}.")
        if data and "enabled" in known and "enabled" not in data:
            data["enabled"] = True  # a section the user writes out is a section the user wants; `enabled: false` opts out
        return cls(**data)


@dataclass
class QuantizationSection(Section):
    """Low-bit linear layers (and optionally the embedding); enabled by any ``scheme`` but ``none``."""

    name: ClassVar[str] = "quantization"
    SCHEMES: ClassVar[tuple] = ("none", "int8", "int4", "w8a8", "nf4")
    LAYER_SCHEMES: ClassVar[tuple] = ("none", "int8", "int4", "w8a8")
    CALIBRATIONS: ClassVar[tuple] = ("none", "awq", "gptq", "awq+gptq")
    BACKENDS: ClassVar[tuple] = ("hf_vram", "bitsandbytes")

    scheme: str = setting(
        "none",
        "none; int8 (weight-only, symmetric, per output channel); int4 (weight-only, group-wise, two values per byte); "
        "w8a8 (int8 weights and per-token dynamic int8 activations); nf4 (bitsandbytes backend only).",
        checks.choice(*SCHEMES),
    )
    backend: str = setting(
        "hf_vram",
        "hf_vram's own layers and kernels, or bitsandbytes (int8 = LLM.int8, nf4) for users who want its format.",
        checks.choice(*BACKENDS),
    )
    group_size: int = setting(
        128,
        "int4 group along the input dimension. A layer whose input size it does not divide is zero-padded to a whole "
        "group (the pad quantizes to exact zeros), so every group really holds group_size weights.",
        checks.choice(32, 64, 128, 256, text="32, 64, 128 or 256"),
    )
    symmetric: bool = setting(False, "int4 without zero points (asymmetric groups have integer zero points).", checks.boolean)
    scale_search: str = setting(
        "clip",
        "clip: each int4 group's range is chosen from a grid of clipping ratios to minimise its squared weight error "
        "(no data); none: plain min/max.",
        checks.choice("none", "clip"),
    )
    quantize_embeddings: bool = setting(
        False, "Also store the input embedding as int8 per row; a tied output head reads the same storage.", checks.boolean
    )
    modules_to_not_convert: list[str] | None = setting(
        None,
        "Exact module names, dotted suffixes or regexes (full match) kept in float; each must match a module, and "
        "what matched is reported.",
        checks.patterns,
    )
    compute_dtype: str = setting(
        "auto",
        "Activation dtype of quantized matmuls; auto: bfloat16 for the packed CPU kernels, the model's dtype elsewhere.",
        checks.choice(*DTYPES),
    )
    calibration: str = setting(
        "none",
        "Quantization that reads calibration_samples 512-token windows, one decoder block at a time: awq folds "
        "per-channel scales (mean|x|^alpha, alpha searched) into the producing norm or projection; gptq rounds column "
        "by column with second-order error compensation; awq+gptq both. Needs the float model in memory (through "
        "from_pretrained the weights load in float, then quantize). Text: the end of CPython's pydoc topics unless "
        "hf_vram.optimize is given token ids.",
        checks.choice(*CALIBRATIONS),
    )
    calibration_samples: int = setting(8, "Calibration windows of 512 tokens.", checks.positive_int)
    act_order: bool = setting(
        True, "GPTQ quantizes columns by decreasing activation energy (static groups: the layout is unchanged).", checks.boolean
    )
    dampening: float = setting(
        0.01,
        "GPTQ adds dampening * mean(diag(H)) to its Hessian's diagonal.",
        checks.number(0, 1, low_open=True, high_open=True, example="0.01"),
    )
    layer_schemes: dict[str, str] | None = setting(
        None,
        "Per-layer overrides {exact module name: scheme}; none keeps a layer in float.",
        checks.scheme_map(LAYER_SCHEMES),
    )

    def check_together(self) -> None:
        if self.backend == "hf_vram" and self.scheme == "nf4":
            fail(self.name, "scheme", self.scheme, "'nf4' only with backend='bitsandbytes'")
        if self.backend == "bitsandbytes" and self.scheme not in ("none", "int8", "nf4"):
            fail(self.name, "scheme", self.scheme, "'int8' or 'nf4' with backend='bitsandbytes'")
        if self.backend != "hf_vram" and self.layer_schemes:
            fail(
                self.name,
                "layer_schemes",
                self.layer_schemes,
                "null with backend 'bitsandbytes' (per-layer schemes are hf_vram's)",
            )

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def scheme_for(self, module_name: str) -> str:
        """The scheme of one linear layer: hf_vram's decision (planner, import), else the user's override, else the
        section's ``scheme``."""
        decided = (self.state.layer_schemes or {}).get(module_name)
        return decided or (self.layer_schemes or {}).get(module_name, self.scheme)

    def overridden_layers(self) -> set[str]:
        """Every layer with a per-layer scheme, the user's or hf_vram's."""
        return set(self.layer_schemes or {}) | set(self.state.layer_schemes or {})

    def has_act_scales(self, module_name: str) -> bool:
        """Whether a quantized layer divides its input by saved activation scales at run time."""
        if self.calibration == "none":
            return False
        layers = self.state.act_scale_layers
        return layers is None or module_name in layers

    @property
    def scale_dtype(self) -> str:
        """How int4 scales and zeros are stored (``state.scale_dtype``)."""
        return self.state.scale_dtype


@dataclass
class FusionSection(Section):
    """Fused norms, projections and attention."""

    name: ClassVar[str] = "fusion"
    enabled: bool = setting(False, "Fuse the model's norms, projections and attention.", checks.boolean)
    norms: bool = setting(True, "One-pass RMSNorm (with the residual add where the architecture allows).", checks.boolean)
    projections: bool = setting(True, "One matmul for q/k/v and for gate/up.", checks.boolean)
    attention: str = setting(
        "hf_vram", "hf_vram: O(n)-memory attention; sdpa: PyTorch's; none: leave it.", checks.choice("sdpa", "hf_vram", "none")
    )


@dataclass
class PruningSection(Section):
    """Structured pruning of attention heads and MLP channels, plus optional weight sparsity. The plan it makes
    (kept heads, removed channels per layer) is recorded in ``state.pruning_plan`` and saved with the model, so
    ``from_pretrained`` rebuilds the pruned shapes."""

    name: ClassVar[str] = "pruning"
    enabled: bool = setting(False, "Prune the model.", checks.boolean)
    head_ratio: float | dict = setting(
        0.0, "Fraction of attention heads to remove: one number, or {layer index: ratio}.", checks.ratio_or_per_layer
    )
    mlp_ratio: float | dict = setting(
        0.0, "Fraction of MLP channels to remove: one number, or {layer index: ratio}.", checks.ratio_or_per_layer
    )
    method: str = setting(
        "taylor", "Importance score of a head or channel.", checks.choice("taylor", "activation", "magnitude", "random")
    )
    min_heads_per_layer: int = setting(1, "Heads every layer keeps at least.", checks.positive_int)
    calibration_samples: int = setting(8, "Windows of text the scores read.", checks.positive_int)
    calibration_length: int = setting(256, "Tokens per window.", checks.positive_int)
    steps: int = setting(1, "Prune progressively in this many cuts, re-scoring between them.", checks.positive_int)
    seed: int = setting(0, "Seed of the random method.", checks.integer)
    sparsity: str = setting(
        "none", "Weight sparsity after the structured cuts.", checks.choice("none", "unstructured", "block16")
    )
    sparsity_ratio: float = setting(0.0, "Fraction of weights zeroed by the sparsity.", checks.ratio)

    @property
    def plan(self) -> dict | None:
        """The pruning plan hf_vram made or reloads (``state.pruning_plan``)."""
        return self.state.pruning_plan


@dataclass
class KVCacheSection(Section):
    """The KV cache: its storage dtype and budget, for hf_vram's pool under ``generate`` and for Transformers'
    continuous batching (``generate_batch``, ``transformers serve``) alike."""

    name: ClassVar[str] = "kv_cache"
    POOL_DTYPES: ClassVar[tuple] = ("auto", "int8", "float32", "bfloat16", "float16")

    enabled: bool = setting(False, "generate() runs over hf_vram's block pool shared by its sequences.", checks.boolean)
    block_size: int = setting(16, "Tokens per block of the pool (a power of two).", checks.positive_int)
    num_blocks: int | None = setting(
        None, "Blocks in the pool; null sizes it from max_memory, else from the request.", checks.at_least(1, optional=True)
    )
    max_memory: int | str | None = setting(
        None,
        "The KV budget in bytes (or a size such as '2GiB'): the pool's size, and continuous batching's cache when "
        "its own config sets none.",
        checks.byte_size,
    )
    dtype: str = setting(
        "auto",
        "K/V storage: the model's dtype (auto); int8 (a scale per token and head); int4 or int2 (KIVI-style: keys "
        "per channel over groups of 64 tokens, values per token, the unfinished group in int8; int2 also keeps the "
        "first group and the last 3 in int8: sink_tokens, recent_tokens). "
        "int4/int2 are continuous batching's (the pool holds up to int8).",
        checks.choice("auto", "int8", "int4", "int2", "float32", "bfloat16", "float16"),
    )
    offload_memory: int | str | None = setting(
        None,
        "Host memory (bytes or a size such as '8GiB') for the pool's coldest full blocks when max_memory is full: a "
        "context longer than the device budget, its oldest blocks read back a segment at a time. null: none.",
        checks.byte_size,
    )
    sink_tokens: int | None = setting(
        None,
        "int4/int2: each request's first tokens kept in int8 beside their quantized pages (the attention sink), a "
        "multiple of 64 (the key group). null: 0 at int4, 64 at int2.",
        checks.at_least(0, optional=True),
    )
    recent_tokens: int | None = setting(
        None,
        "int4/int2: each request's last whole tokens kept in int8 beside their quantized pages, besides the unfinished "
        "key group (KIVI's residual; Transformers' QuantizedCache residual_length), a multiple of 64. More keeps "
        "quality (long contexts: with sink_tokens 64, 64 at int4 found the passkey in 25 of 40 prompts of 1k-8k "
        "tokens, plain int4 23, bfloat16 K/V 26), less holds more requests in the budget. null: 0 at int4, 192 at "
        "int2.",
        checks.at_least(0, optional=True),
    )
    rotate_values: bool = setting(
        False,
        "int2: values stored turned by a Hadamard matrix (the attention turns its output back), so a few large "
        "channels no longer set a token's range (int2 at 8k tokens, SmolLM2: +12.81% perplexity instead of +13.00% "
        "plain, more with the other int2 settings). int4 always turns them: its value rows keep one symmetric scale "
        "for turned values (SmolLM2 at 8k: +0.76% perplexity against +0.94% turned with a scale and low per head, "
        "+1.56% unturned), so this setting changes nothing there.",
        checks.boolean,
    )
    int8_layers: int | list[int] | None = setting(
        None,
        "int4/int2: layers whose K/V pages are int8 (a scale per token and head) instead, in pages two (int2: four) "
        "rows wide: the few layers where 4 bits lose most. A list of layer indices, or a count: hf_vram then picks "
        "that many when it optimizes the model, by each layer's own loss on calibration text "
        "(hf_vram.kvcache.readback.int8_layers_by_readback), and saves the list. SmolLM2 at 8k tokens, int4 with "
        "its values turned (always): one layer +0.42% perplexity and a passkey in 26 of 40 prompts at 0.282x "
        "bfloat16's bytes (none: +0.76%, 24, 0.270x). null: every layer at dtype's width.",
        checks.layer_indices_or_count,
    )
    int4_layers: int | list[int] | None = setting(
        None,
        "int2: layers whose K/V pages are int4 instead (KIVI at 4 bits, the same window), in pages two rows wide, "
        "as int8_layers picks them (a list, or a count hf_vram chooses by each layer's own int2 loss). Cheaper than "
        "int8_layers at int2 (one more page a layer, not three): what fits 0.18x of bfloat16's bytes with "
        "recent_tokens: 128 (two lagging groups). SmolLM2 at 8k tokens, int2 with that, values turned and one int4 "
        "layer: perplexity +2.50% and a passkey in 26 of 40 prompts (bfloat16's count) at 0.178x bfloat16's bytes "
        "(plain int2: +3.54%, 23, 0.177x; benchmarks/long_context.py). null: every layer at int2.",
        checks.layer_indices_or_count,
    )
    step_prefill_tokens: int | None = setting(
        None,
        "Continuous batching: the prompt tokens one step may carry while other requests are decoding (a longer "
        "prompt continues in the next steps), so no decoding request waits for a burst of prefills: the server's "
        "p99 time per output token. null: Transformers' FIFO scheduler (the step's whole max_batch_tokens).",
        checks.at_least(1, optional=True),
    )
    prefill_chunk: int | None = setting(
        None,
        "generate() prefills a prompt in chunks of this many tokens (Transformers' prefill_chunk_size, set on the "
        "model's generation config unless that names its own): the activations of a chunk instead of the whole "
        "prompt's, the same tokens. null: one pass. The planner sets it when context_tokens needs it.",
        checks.at_least(1, optional=True),
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Section:
        data = dict(data or {})
        if data.get("dtype") in ("int4", "int2"):  # written for continuous batching: the pool stays off unless asked
            data.setdefault("enabled", False)
        return super().from_dict(data)

    def storing(self, dtype: str) -> KVCacheSection:
        """This section with K/V stored as ``dtype``: 'auto' the model's dtype (pool on or off as it was), 'int8'
        in hf_vram's pool (``generate`` and continuous batching), 'int4'/'int2' in continuous batching's pages."""
        data = self.to_dict()
        data["dtype"] = dtype
        if dtype not in ("int4", "int2"):
            data["int8_layers"] = None  # widened int4/int2 layers: every layer is int8 or wider already
        if dtype != "int2":
            data["int4_layers"] = None  # int4 layers in int2 pages: every layer is int4 or wider already
        if dtype == "int8":
            data["enabled"] = True
        elif dtype in ("int4", "int2"):
            data["enabled"] = False
        return type(self)(**data)

    def check_together(self) -> None:
        if self.block_size & (self.block_size - 1):
            fail(self.name, "block_size", self.block_size, "a power of two")
        for name in ("sink_tokens", "recent_tokens"):
            if getattr(self, name) is not None and getattr(self, name) % KEY_GROUP_TOKENS:
                fail(self.name, name, getattr(self, name), f"null or a multiple of {KEY_GROUP_TOKENS} (the int4/int2 key group)")
        if self.int8_layers is not None and self.dtype not in ("int4", "int2"):
            fail(
                self.name,
                "int8_layers",
                self.int8_layers,
                "null unless dtype is int4 or int2 (it widens those layers' pages to int8; other dtypes store every layer alike)",
            )
        if self.int4_layers is not None and self.dtype != "int2":
            fail(
                self.name,
                "int4_layers",
                self.int4_layers,
                "null unless dtype is int2 (it widens those layers' int2 pages to int4; at int4 and wider every layer is)",
            )
        if self.int4_layers is not None and self.int8_layers is not None:
            fail(self.name, "int4_layers", self.int4_layers, "null while int8_layers is set (layers widen to one width)")
        if self.enabled and self.dtype not in self.POOL_DTYPES:
            fail(
                self.name,
                "dtype",
                self.dtype,
                "one of " + ", ".join(map(repr, self.POOL_DTYPES)) + " with enabled: true (hf_vram's pool for "
                "generate() holds K/V down to int8); int4 and int2 are for continuous batching: set enabled: false",
            )


@dataclass
class RecoverySection(Section):
    """Distillation recovery settings used by the Trainer callbacks."""

    name: ClassVar[str] = "recovery"
    enabled: bool = setting(False, "The recovery recipe applies.", checks.boolean)
    temperature: float = setting(2.0, "Distillation temperature T.", checks.number(0, float("inf"), low_open=True))
    alpha: float = setting(0.5, "Loss = alpha * CE + (1 - alpha) * T^2 * KL.", checks.weight)
    learning_rate: float = setting(1e-5, "Learning rate of the recipe.", checks.number(0, float("inf"), low_open=True))
    top_k: int = setting(
        0,
        "> 0: cache the teacher's top-k logits on disk in cache_dir (for repeated epochs); 0: full logits each step.",
        checks.at_least(0),
    )
    cache_dir: str | None = setting(None, "Where the top-k teacher logits are cached.")
    lora_rank: int = setting(16, "LoRA rank on the frozen quantized layers.", checks.positive_int)
    lora_alpha: int = setting(32, "LoRA alpha.", checks.positive_int)

    def check_together(self) -> None:
        if self.top_k and not (isinstance(self.cache_dir, str) and self.cache_dir):
            fail(self.name, "cache_dir", self.cache_dir, "a directory path when top_k > 0")


@dataclass
class PlannerSection(Section):
    """Fit the model into a memory budget (``VramOptimizationConfig(target_memory="...")``).

    The planner measures each linear layer's sensitivity on calibration text (a Fisher-weighted quantization error
    from one backward pass), then chooses per-layer schemes (float/int8/int4), and MLP-channel pruning only when
    int4 everywhere does not fit, so the weights, plus the KV cache and the prefill activations of
    ``context_tokens`` tokens (K/V storage and prefill chunk chosen with the weights), stay under ``target_memory``
    with the least estimated loss. Its choices become the plan the pipeline
    carries out (the model's saved config); its summary is ``state.budget``.
    """

    name: ClassVar[str] = "planner"
    target_memory: int | str | None = setting(None, "The budget: bytes, or a size such as '1.5GB' or '600MiB'.", checks.byte_size)
    context_tokens: int = setting(
        0, "Tokens of context the budget must also hold: their KV cache and their prefill's activations.", checks.at_least(0)
    )
    kv_dtypes: list[str] = setting(
        ("auto", "int8"),
        "K/V storages the planner may choose for context_tokens: auto (the model's dtype), int8 (hf_vram's pool, "
        "generate and continuous batching), int4 / int2 (continuous batching's pages only: generate_batch, "
        "hf-vram serve).",
        checks.subset("auto", "int8", "int4", "int2"),
    )
    calibration_samples: int = setting(4, "Windows of text the sensitivities read.", checks.positive_int)
    calibration_length: int = setting(256, "Tokens per window.", checks.positive_int)
    max_mlp_ratio: float = setting(0.5, "The most MLP channels the planner may prune.", checks.ratio)

    @property
    def enabled(self) -> bool:
        return self.target_memory is not None

    @property
    def plan(self) -> dict | None:
        """The planner's summary once it ran (``state.budget``)."""
        return self.state.budget


SECTIONS: dict[str, type[Section]] = {
    cls.name: cls for cls in (QuantizationSection, FusionSection, PruningSection, KVCacheSection, RecoverySection, PlannerSection)
}
