"""Activation-aware scales (AWQ for weight-only schemes, SmoothQuant for W8A8), folded into the model where the math
allows, as AWQ does.

Layers that read the same input (q/k/v; gate/up) form a *scale group* and share one per-input-channel scale
``s = mean|x|^alpha`` (normalised so that ``max * min = 1``), with ``alpha`` searched on recorded inputs to minimise
the group's summed output error ``sum ||Q(W s)(x / s) - W x||^2`` under the layer's own scheme (``layer.simulate``:
for W8A8 that quantizes the scaled activations too). Alpha 0 is plain quantization, so on the calibration inputs
the scales never do worse than none.

Where the group's input is the output of a module that can absorb ``1 / s`` exactly, the scale is *folded* there
and costs nothing at run time: the norm before q/k/v or gate/up (its weight, and bias for LayerNorm; Gemma's
``1 + weight`` form included), ``up_proj`` rows before ``down_proj`` (``act(gate) * up`` is linear in ``up``), and
``v_proj`` rows before ``o_proj`` when every ``o_proj`` input channel is one ``v_proj`` output (MHA; with grouped-query
attention a KV head feeds several query heads, and ``o_proj`` is left unscaled, as AutoAWQ does). The weights then
hold ``W * s`` and the model computes the same function in float. Elsewhere (architectures without this table,
e.g. GPT-2, OPT, BERT) each layer keeps its scales as ``act_scales`` and divides its input at run time; such a model
cannot be exported to formats without that slot (``hf_vram.export`` refuses it by name).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

ALPHAS = tuple(i / 10 for i in range(11))
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


@dataclass
class ScaleGroup:
    """Quantized layers reading one input, and where that input's scale can be folded (None: at run time)."""

    layers: list[str]
    fold_into: str | None = None
    rows: tuple[int, int] | None = None  # the producer's output rows that form this input (a fused gate_up_proj)
    scaled: bool = True  # False: no AWQ scale at all (o_proj under grouped-query attention)


def scale_groups(model: nn.Module, block_name: str, block: nn.Module, targets: list[str]) -> list[ScaleGroup]:
    """The scale groups of one decoder block's target layers (every target in exactly one group)."""
    groups: list[ScaleGroup] = []
    taken: set[str] = set()

    def full(rel: str) -> str:
        return f"{block_name}.{rel}"

    def add(rels: list[str], fold: str | None, rows=None, *, unscaled_if_unfoldable: bool = False) -> None:
        names = [full(r) for r in rels]
        if names and all(n in targets for n in names) and not (set(names) & taken):
            folder = full(fold) if fold is not None and _foldable(model, full(fold), rows) else None
            groups.append(ScaleGroup(names, folder, rows, scaled=folder is not None or not unscaled_if_unfoldable))
            taken.update(names)

    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None and hasattr(block, "input_layernorm"):
        qkv = (
            ["self_attn.qkv_proj"] if hasattr(attn, "qkv_proj") else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        )
        add(qkv, "input_layernorm")
        add(["self_attn.o_proj"], *_v_rows(attn), unscaled_if_unfoldable=True)
    if mlp is not None and hasattr(block, "post_attention_layernorm"):
        fused = hasattr(mlp, "gate_up_proj")
        add(["mlp.gate_up_proj"] if fused else ["mlp.gate_proj", "mlp.up_proj"], "post_attention_layernorm")
        if fused:
            width = mlp.gate_up_proj.out_features // 2
            add(["mlp.down_proj"], "mlp.gate_up_proj", (width, 2 * width))
        else:
            add(["mlp.down_proj"], "mlp.up_proj")
    for name in targets:  # everything else keeps run-time scales, one group per layer
        if name not in taken:
            groups.append(ScaleGroup([name]))
    return groups


def _v_rows(attn: nn.Module) -> tuple[str | None, tuple[int, int] | None]:
    """Where ``o_proj``'s input can fold: ``v_proj`` (or the v rows of a fused qkv) when its rows map 1:1."""
    o_in = attn.o_proj.in_features
    if hasattr(attn, "qkv_proj"):
        v_out = attn.v_proj.out_features if hasattr(attn, "v_proj") else None  # Phi-3 keeps no v_proj
        if v_out is None or v_out != o_in:
            return None, None
        total = attn.qkv_proj.out_features
        return "self_attn.qkv_proj", (total - v_out, total)
    if hasattr(attn, "v_proj") and attn.v_proj.out_features == o_in:
        return "self_attn.v_proj", None
    return None, None


def _foldable(model: nn.Module, name: str, rows) -> bool:
    module = model.get_submodule(name)
    cls = type(module).__name__
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None
    if cls == "FusedRMSNorm" or cls in _RMS_NORMS or cls == "GemmaRMSNorm":
        return rows is None and getattr(module, "weight", None) is not None
    return False


@torch.no_grad()
def fold(model: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Divide the producer's output by ``scales`` (the group's weights are multiplied by them when quantized)."""
    module = model.get_submodule(group.fold_into)
    s = scales.to(torch.float32)
    if isinstance(module, nn.Linear):
        start, stop = group.rows or (0, module.out_features)
        dtype = module.weight.dtype
        module.weight[start:stop] = (module.weight[start:stop].float() / s[:, None]).to(dtype)
        if module.bias is not None:
            module.bias[start:stop] = (module.bias[start:stop].float() / s).to(dtype)
        return
    weight = module.weight
    gemma = type(module).__name__ == "GemmaRMSNorm" or getattr(module, "variant", None) == "gemma"
    if gemma:  # y = normed * (1 + w): (1 + w') = (1 + w) / s
        weight.copy_(((1.0 + weight.float()) / s - 1.0).to(weight.dtype))
    else:
        weight.copy_((weight.float() / s).to(weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.copy_((module.bias.float() / s).to(module.bias.dtype))


@torch.no_grad()
def search_group_scales(layers: list, weights: list[torch.Tensor], x: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
    """The best shared scale for layers (each supplies its scheme's ``_quantize``/``simulate``) reading ``x``."""
    targets = [x @ w.t() for w in weights]
    mean_abs = mean_abs.clamp(min=1e-6)
    searched = [_plain_rounding(layer) for layer in layers]
    best, best_err = None, float("inf")
    for alpha in ALPHAS:
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s[None, :]
        err = 0.0
        for layer, w, target in zip(searched, weights, targets, strict=True):
            err += (layer.simulate(xs, layer.quantize_weight(w * s[None, :])) - target).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def _plain_rounding(layer):
    """The layer as the alpha search sees it: int4's clipping search off (13x cheaper per trial; the final
    quantization still searches the clipping range, on the scaled weights)."""
    if getattr(layer, "scale_search", "none") == "none":
        return layer
    plain = copy.copy(layer)
    plain.scale_search = "none"
    return plain
