"""The quantization stage: swap modules in memory, build the empty skeleton for loading, and undo it.

``quantize_model`` (the in-memory door, used by ``hf_vram.optimize``) and ``build_skeleton`` + the quantize op
(the ``from_pretrained`` door) both go through ``make_layer`` and each layer's ``quantize_weight``, so the two
doors give bit-identical tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hf_vram.config import QuantizationSection
from hf_vram.data import default_calibration_ids
from hf_vram.quant.build import float_weight, install_layer, make_layer
from hf_vram.quant.embedding import Int8Embedding, TiedInt8Head, embedding_scale
from hf_vram.quant.linear import QuantLinear
from hf_vram.quant.select import QuantTargets, select_targets
from hf_vram.quant.sequential import quantize_blocks

QUANTIZED_MODULES = (QuantLinear, Int8Embedding)


def select_layers(model: nn.Module, section: QuantizationSection) -> QuantTargets:
    """``select_targets`` plus the per-layer overrides: a ``none`` entry stays float, an unknown name is an error."""
    plan = select_targets(model, section.modules_to_not_convert, section.quantize_embeddings)
    overrides = section.overridden_layers()
    already = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}  # imported, quantized already
    unknown = sorted(set(overrides) - set(plan.linears) - set(plan.skipped) - already)
    if unknown:
        raise ValueError(
            f"hf_vram: quantization.layer_schemes names {unknown[:4]} that are not linear layers of this model "
            f"(e.g. {plan.linears[:2]}); use exact module names as model.named_modules() gives them."
        )
    for name in [n for n in plan.linears if section.scheme_for(n) == "none"]:
        plan.linears.remove(name)
        plan.skipped[name] = "kept in float (layer_schemes)"
    return plan


def check_finite_weights(model: nn.Module, section: QuantizationSection) -> None:
    """Refuse NaN/Inf in any weight the quantization stage would read, before any stage touches the model.

    Per-layer schemes are not checked here: they name the layers as they are after pruning and fusion.
    """
    plan = select_targets(model, section.modules_to_not_convert, section.quantize_embeddings)
    names = list(plan.linears) + ([plan.embedding] if plan.embedding else [])
    bad = [n for n in names if not torch.isfinite(model.get_submodule(n).weight).all()]
    if bad:
        raise ValueError(
            f"hf_vram: NaN/Inf values in the weight of {bad[:3]}{' and more' if len(bad) > 3 else ''}; quantizing "
            "them would give garbage. Fix the checkpoint (re-download or re-train), or list these modules in "
            "quantization.modules_to_not_convert. The model was not changed."
        )


def _untie(model: nn.Module, plan: QuantTargets) -> None:
    """Drop the Transformers tie for a head that now reads the int8 embedding itself."""
    if plan.head is None or not hasattr(model, "all_tied_weights_keys"):
        return
    keys = dict(model.all_tied_weights_keys)
    for key in (f"{plan.head}.weight", f"{plan.embedding}.weight"):
        keys.pop(key, None)
    model.all_tied_weights_keys = keys


def build_skeleton(
    model: nn.Module, section: QuantizationSection, *, placeholder_dtype: torch.dtype | None, float_dtype: torch.dtype | None
) -> QuantTargets:
    """Swap empty quantized layers into a meta model before its weights load.

    ``placeholder_dtype`` given: the checkpoint is float, each layer gets a meta ``weight`` placeholder that routes
    it to the quantize op. None: the checkpoint is already quantized and loads straight into the buffers.
    ``float_dtype``: the dtype the model is loaded in (``from_pretrained(dtype=...)``), which an int8 embedding
    must return its rows in.
    """
    plan = select_layers(model, section)
    for name in plan.linears:
        old = model.get_submodule(name)
        with torch.device("meta"):
            layer = make_layer(old, section, "meta", section.scheme_for(name), section.has_act_scales(name))
        if placeholder_dtype is not None:
            layer.add_load_placeholder(placeholder_dtype)
        model.set_submodule(name, layer)
    if plan.embedding is not None:
        old = model.get_submodule(plan.embedding)
        emb = Int8Embedding(
            old.num_embeddings,
            old.embedding_dim,
            old.padding_idx,
            out_dtype=float_dtype or torch.float32,
            embed_scale=embedding_scale(old),
            device="meta",
        )
        if placeholder_dtype is not None:
            emb.add_load_placeholder(placeholder_dtype)
        model.set_submodule(plan.embedding, emb)
        if plan.head is not None:
            head = model.get_submodule(plan.head)
            model.set_submodule(plan.head, _tied_head(emb, head, section))
    _untie(model, plan)
    return plan


def _tied_head(emb: Int8Embedding, head: nn.Module, section: QuantizationSection) -> TiedInt8Head:
    return TiedInt8Head(emb, getattr(head, "bias", None), compute_dtype=section.compute_dtype)


def quantize_model(model: nn.Module, section: QuantizationSection, calibration_ids: torch.Tensor | None = None) -> QuantTargets:
    """Quantize a model that is already in memory, one layer at a time (no whole-model float copy).

    A calibrated section (``awq``, ``gptq``, ``awq+gptq``) runs block by block on ``calibration_ids`` (default: the
    end of the pydoc text, ``calibration_samples`` windows of 512 tokens) and records in the section which layers
    kept run-time activation scales, so a saved model reloads with exactly those buffers.
    """
    plan = select_layers(model, section)
    if section.calibration != "none":
        if calibration_ids is None:
            calibration_ids = default_calibration_ids(model, section.calibration_samples)

        def build(name: str, module: nn.Module, act_scales: bool) -> QuantLinear:
            return make_layer(module, section, module.weight.device, section.scheme_for(name), act_scales)

        section.state.act_scale_layers = sorted(quantize_blocks(model, plan.linears, section, calibration_ids, build))
    else:
        for name in plan.linears:
            old = model.get_submodule(name)
            layer = make_layer(old, section, old.weight.device, section.scheme_for(name))
            install_layer(model, name, layer, layer.quantize_weight(float_weight(old)), old.bias)
    if plan.embedding is not None:
        old = model.get_submodule(plan.embedding)
        emb = Int8Embedding.from_float(old)
        model.set_submodule(plan.embedding, emb)
        if plan.head is not None:
            model.set_submodule(plan.head, _tied_head(emb, model.get_submodule(plan.head), section))
    _untie(model, plan)
    return plan


def finish_loading(model: nn.Module) -> None:
    """After ``from_pretrained`` filled the skeleton: drop placeholders, check every tensor arrived, pick layouts."""
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_MODULES):
            continue
        module.drop_load_placeholder()
        expected = list(module.quantized_buffers)
        if getattr(module, "act_scales", None) is not None:
            expected.append("act_scales")
        for buf_name in expected:
            buf = getattr(module, buf_name)
            if buf.device.type == "meta" or not getattr(buf, "_is_hf_initialized", False):
                problems.append(f"{name}.{buf_name} was not in the checkpoint")
        if not problems:
            module.prepare_for_device()
    if problems:
        raise ValueError(
            "hf_vram: the checkpoint does not match its saved hf_vram config: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". The files are truncated or were written by another config: save the model again, or load the float "
            "checkpoint with a fresh VramOptimizationConfig."
        )


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every hf_vram layer by its float equivalent; a tied head is re-tied to the float embedding."""
    float_embeddings: dict[int, nn.Embedding] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Embedding):
            emb = module.to_float_embedding(dtype)
            float_embeddings[id(module)] = emb
            model.set_submodule(name, emb)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, module.to_float_linear(dtype))
        elif isinstance(module, TiedInt8Head):
            emb = float_embeddings[id(module.embedding)]
            head = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            head.weight = emb.weight
            if module.bias is not None:
                head.bias = nn.Parameter(module.bias.detach().to(dtype))
            model.set_submodule(name, head)
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return model
