"""LoRA adapters on hf_vram's quantized layers, through PEFT's custom-module hook.

PEFT dispatches LoRA by the base layer's type and knows nothing of ``QuantLinear``; its (experimental, documented)
``LoraConfig._register_custom_module`` maps our layer type to ``QuantLoraLinear`` below. That mapping is not saved
in ``adapter_config.json``, so :func:`load_lora_adapter` registers it again when an adapter is reloaded.

The frozen base runs its packed int8/int4 kernel; the gradient reaches the input through
``quant.linear._FrozenQuantMatmul``, so only the low-rank ``A``/``B`` matrices train. Merging dequantizes the base,
adds ``B @ A * scaling`` and re-quantizes with the layer's own scheme, like PEFT's bitsandbytes merge. That rounding
can take back what training won: a short recovery run moves most weights by less than half a quantization step
(the ``prune_and_recover`` notebook, SmolLM2 pruned + int4 g128 after 8 distillation steps: the merge keeps 0.1% of
the update, median over its 210 layers; held-out perplexity about 46 with the adapter, 114.5 merged, 115.0 before).
So each merge measures the share of the update its layer kept (``merge_kept``) and warns, naming the fix, when it
kept less than ``MERGE_KEPT_WARNING``: keep such an adapter unmerged (saved beside the compressed base).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils import get_peft_model_state_dict, load_peft_weights

from hf_vram.quant.linear import QuantLinear

MERGE_KEPT_WARNING = 0.5  # below this share of the adapter's update kept, a merge warns (the model loses recovery)
MERGE_LOSS_ADVICE = (
    "keep the adapter unmerged instead: save the compressed model before add_lora (save_pretrained), the adapter "
    "after training (peft_model.save_pretrained(dir)), and serve them with hf_vram.load_lora_adapter(model, dir)"
)


class QuantLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen ``QuantLinear`` (int8, int4 or W8A8)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(
        self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs: Any
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        if config.use_dora or config.alora_invocation_tokens is not None or config.arrow_config is not None:
            raise ValueError(
                "hf_vram: only plain LoRA is supported on quantized layers (DoRA, aLoRA and Arrow are not); set use_dora=False."
            )
        return None

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT reads ``compute_dtype`` as a torch dtype (bnb's convention); ours is a config string. Adapters train
        # in the layer's compute dtype, float32 when that is "auto".
        return base_layer.qweight.device, base_layer.matmul_dtype or torch.float32

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight).float() * self.scaling[adapter]

    def _requantize(self, weight: torch.Tensor) -> None:
        base: QuantLinear = self.get_base_layer()
        tensors = base.quantize_weight(weight, base.act_scales)
        base.load_quantized({name: t.to(base.qweight.device) for name, t in tensors.items()})

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()  # ``merge_kept`` stays on the quantized layer after ``merge_and_unload``
            before, delta = base.dequantize_weight(torch.float32), self.get_delta_weight(adapter)
            weight = before + delta
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"hf_vram: merging adapter '{adapter}' gives NaN/Inf weights; the adapter is broken.")
            self._requantize(weight)
            self.merged_adapters.append(adapter)
            base.merge_kept = merge_kept(before, base.dequantize_weight(torch.float32), delta)
            if base.merge_kept < MERGE_KEPT_WARNING:  # one text per scheme: Python shows it once, not per layer
                warnings.warn(
                    f"hf_vram: merging LoRA into {base.scheme} layers re-quantizes them, and the rounding took back most "
                    f"of the adapter's update (a layer kept under {MERGE_KEPT_WARNING:.0%} of it; see each layer's "
                    f"merge_kept): the merged model loses what training won. To keep it, {MERGE_LOSS_ADVICE}.",
                    stacklevel=2,
                )

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._requantize(self.get_base_layer().dequantize_weight(torch.float32) - self.get_delta_weight(adapter))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            delta = lora_b(lora_a(self.lora_dropout[adapter](x.to(lora_a.weight.dtype)))) * self.scaling[adapter]
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def merge_kept(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> float:
    """The share of ``delta`` a re-quantization kept: the projection of what the weight moved onto what the adapter
    asked for (1.0: all of it; 0.0: the rounding returned the old weight; an empty update counts as kept)."""
    norm = float((delta.double() ** 2).sum())
    if norm == 0.0:
        return 1.0
    return float(((after.double() - before.double()) * delta.double()).sum()) / norm


def linear_module_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Leaf names (``q_proj``, ``qkv_proj`` ...) of the quantized and float linear layers LoRA can target."""
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if isinstance(module, (QuantLinear, nn.Linear)) and leaf not in skip:
            names.add(leaf)
    if not names:
        raise ValueError("hf_vram: the model has no linear layers for LoRA to target.")
    return sorted(names)


def register_quant_layers(config: LoraConfig) -> LoraConfig:
    """Teach a PEFT ``LoraConfig`` to wrap hf_vram's quantized layers (needed again after every reload)."""
    config._register_custom_module({QuantLinear: QuantLoraLinear})  # PEFT matches by isinstance: all schemes
    return config


def lora_config(
    model: nn.Module, r: int = 16, lora_alpha: int = 32, target_modules: list[str] | None = None, **kwargs: Any
) -> LoraConfig:
    """A causal-LM ``LoraConfig`` over every linear layer but the head, registered for hf_vram's layers."""
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or linear_module_names(model),
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )
    return register_quant_layers(config)


def add_lora(model: nn.Module, config: LoraConfig | None = None, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` (quantized or not) with trainable LoRA adapters; the base stays frozen."""
    config = register_quant_layers(config) if config is not None else lora_config(model, **kwargs)
    with _known_layers():
        return get_peft_model(model, config)


def load_lora_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
    """Reload an adapter saved from an hf_vram model (PEFT alone cannot: the custom mapping is not saved). Every
    saved tensor must land in a layer of ``model`` and every adapter layer must get its tensors (``check_adapter_fits``);
    an adapter that does not fit is refused and ``model`` is left without adapter layers."""
    config = register_quant_layers(LoraConfig.from_pretrained(adapter_dir))
    with _known_layers():
        peft_model = PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)
    try:
        check_adapter_fits(peft_model, adapter_dir)
    except ValueError:
        peft_model.base_model.unload()  # PEFT injected its layers into ``model`` in place: give it back as it came
        raise
    return peft_model


def check_adapter_fits(peft_model: PeftModel, adapter_dir: str) -> None:
    """Raise when the adapter's saved tensors and the layers PEFT put into the model differ. PEFT loads such an
    adapter without a word when its target names match some layers: an adapter trained on a fused model
    (``qkv_proj``, ``gate_up_proj``) on an unfused one loads half its tensors and serves the rest as nothing."""
    saved, placed = set(load_peft_weights(adapter_dir)), set(get_peft_model_state_dict(peft_model))
    if saved != placed:
        unused, missing = sorted(saved - placed), sorted(placed - saved)
        raise ValueError(
            f"hf_vram: the adapter in {adapter_dir} does not fit this model: {len(unused)} saved tensor(s) have no layer "
            f"here (first: {unused[:1]}), {len(missing)} adapter layer tensor(s) have none saved (first: "
            f"{missing[:1]}). Load it onto the model it was trained on: the same checkpoint and hf_vram config "
            "(fusion, pruning and quantization change the layers' names and shapes)."
        )


@contextmanager
def _known_layers() -> Iterator[None]:
    """Silence PEFT's "Unsupported layer type" warning for our layers: QuantLoraLinear supports them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'hf_vram\.")
        yield
