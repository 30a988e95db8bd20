"""The way back in: compressed-tensors layers (llm-compressor's GPTQ/AWQ, vLLM's format) become hf_vram's layers
holding the same codes and scales, never through float.

Two routes: ``convert_compressed_model`` swaps the layers of a model Transformers already loaded (still compressed),
and ``load_compressed_tensors`` reads the codes straight from a folder's safetensors files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from hf_vram import pipeline
from hf_vram.config import QuantizationSection, VramOptimizationConfig, as_config
from hf_vram.hf.attach import attach
from hf_vram.interop.compressed_tensors.checks import FORMAT, ExportError, require_compressed_tensors
from hf_vram.quant import schemes
from hf_vram.quant.build import install_layer, make_layer


@dataclass
class ImportedLayer:
    """One compressed-tensors layer as hf_vram's scheme and saved buffers."""

    scheme: str
    group_size: int | None
    symmetric: bool
    tensors: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of a model that Transformers loaded from a compressed-tensors checkpoint, still compressed."""
    return {
        n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None and isinstance(m, nn.Linear)
    }


def _activations_supported(a) -> bool:
    return a is None or (a.type == "int" and a.num_bits == 8 and a.strategy == "token" and a.dynamic and a.symmetric)


def read_compressed_layer(name: str, scheme, state: dict[str, torch.Tensor]) -> ImportedLayer:
    """hf_vram's buffers for one compressed layer (its ``scheme`` and checkpoint ``state``: ``weight_packed``,
    ``weight_scale``, ...), bit for bit; ``ExportError`` for what hf_vram cannot hold."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w, a = scheme.weights, scheme.input_activations
    where = f"compressed-tensors layer {name}"
    if w is None or w.type != "int" or not _activations_supported(a):
        raise ExportError(
            f"hf_vram cannot take {where}: weights {w and w.model_dump(exclude_none=True)}, activations "
            f"{a and a.model_dump(exclude_none=True)}; it holds integer weights with at most dynamic per-token int8 "
            "activations (int8, int4, W8A8). Load the float model and quantize it instead."
        )
    if "weight_g_idx" in state:
        raise ExportError(
            f"hf_vram cannot take {where}: its groups are permuted (activation order 'group', weight_g_idx), and "
            "hf_vram's groups are contiguous; quantize with actorder 'static'."
        )
    shape = tuple(int(v) for v in state["weight_shape"]) if "weight_shape" in state else tuple(state["weight"].shape)
    if w.num_bits == 4 and w.strategy == "group" and a is None:
        codes = unpack_from_int32(state["weight_packed"], 4, torch.Size(shape)).to(torch.int16) + 8
        scale = state["weight_scale"].float()
        if w.symmetric:
            zero = torch.zeros_like(scale)
        else:
            groups = scale.shape[1]
            zp = unpack_from_int32(state["weight_zero_point"], 4, torch.Size((shape[0], groups)), packed_dim=0)
            zero = (-zp.float()) * scale  # w = (q_ct - zp_ct) * s = (code - 8) * s + (-zp_ct) * s
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # float32; stored per section
        tensors = {"qweight": schemes.pack_int4(codes.to(torch.uint8)), "scales_zeros": scales_zeros}
        return ImportedLayer("int4", w.group_size, w.symmetric, tensors, state.get("bias"))
    if w.num_bits == 8 and w.strategy == "channel" and w.symmetric:
        if "weight_packed" in state:
            codes = unpack_from_int32(state["weight_packed"], 8, torch.Size(shape))
        else:
            codes = state["weight"]
        tensors = {"qweight": codes.to(torch.int8).contiguous(), "scales": state["weight_scale"].float().reshape(-1)}
        return ImportedLayer("w8a8" if a is not None else "int8", None, True, tensors, state.get("bias"))
    raise ExportError(
        f"hf_vram cannot take {where}: {w.num_bits}-bit {w.strategy} {'symmetric' if w.symmetric else 'asymmetric'} "
        "weights; hf_vram holds int8 per channel (symmetric) and int4 per group. Load the float model and quantize "
        "it instead."
    )


def bfloat16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


def convert_compressed_model(model: nn.Module, config: VramOptimizationConfig) -> list[str]:
    """Swap every compressed-tensors layer of a model Transformers loaded (still compressed) for hf_vram's layer
    holding the same codes and scales; see ``install_imported_layers``."""
    layers = compressed_layers(model)
    if not layers:
        raise ExportError("hf_vram: this compressed-tensors model holds no compressed linear layers to convert.")
    imported = {name: read_compressed_layer(name, m.quantization_scheme, m.state_dict()) for name, m in layers.items()}
    return install_imported_layers(model, imported, config)


def _stored_quantization(folder: Path):
    model_config = AutoConfig.from_pretrained(folder)
    stored = getattr(model_config, "quantization_config", None)
    stored = stored.to_dict() if hasattr(stored, "to_dict") else stored
    if not stored or stored.get("quant_method") != FORMAT:
        raise ExportError(
            f"hf_vram: {folder} is not a compressed-tensors checkpoint (no quantization_config with quant_method "
            "'compressed-tensors' in its config.json)."
        )
    del model_config.quantization_config
    return model_config, stored


def _read_states(folder: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each named layer's tensors, as the folder's safetensors files store them."""
    prefixes = {n: f"{n}." for n in names}
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                owner = key.rpartition(".")[0]
                if owner in prefixes:
                    states[owner][key[len(prefixes[owner]) :]] = f.get_tensor(key)
    return states


def load_compressed_tensors(folder: str | Path, config=None, auto_class=None, **kwargs):
    """Load a compressed-tensors checkpoint straight into hf_vram's layers, reading the codes from its files.

    This route does not need Transformers' compressed loader (which, in 5.24, cannot load asymmetric int4: it
    builds unpacked zero points for the packed ones the format stores). The float tensors (embedding, norms, layers
    the checkpoint left in float) load through ``from_pretrained``; the quantized ones come from the safetensors
    files as they are. ``config`` (an hf_vram config, dict or preset) then applies its other stages; the caller's
    config object is not changed (the checkpoint's scheme is filled into a copy).
    """
    require_compressed_tensors("load")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    folder = Path(folder)
    model_config, stored = _stored_quantization(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the compressed tensors are read below, not reported as unexpected keys here
    try:
        model = (auto_class or AutoModelForCausalLM).from_pretrained(folder, config=model_config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    fields = QuantizationConfig.model_fields
    ct_config = QuantizationConfig.model_validate({k: v for k, v in stored.items() if k in fields})
    apply_quantization_config(model, ct_config, run_compressed=False, show_progress=False)
    names = list(compressed_layers(model))
    states = _read_states(folder, names)
    imported = {n: read_compressed_layer(n, model.get_submodule(n).quantization_scheme, states[n]) for n in names}
    config = copy.deepcopy(as_config(config if config is not None else {}))
    install_imported_layers(model, imported, config)
    return attach(model, config, pipeline.apply(model, config))


def _checkpoint_section(imported: dict[str, ImportedLayer], section: QuantizationSection) -> QuantizationSection:
    """The quantization section describing ``imported`` (``section`` must agree with it, or be off)."""
    counts: dict[str, int] = {}
    for layer in imported.values():
        counts[layer.scheme] = counts.get(layer.scheme, 0) + 1
    main = max(counts, key=counts.get)
    int4 = {(i.group_size, i.symmetric) for i in imported.values() if i.scheme == "int4"}
    if len(int4) > 1:
        raise ExportError(
            f"hf_vram: the checkpoint mixes int4 group settings {sorted(int4)}; hf_vram holds one int4 group size and "
            "symmetry per model."
        )
    group, symmetric = next(iter(int4)) if int4 else (section.group_size, section.symmetric)
    if section.enabled and (section.scheme != main or (int4 and (section.group_size, section.symmetric) != (group, symmetric))):
        asked = section.scheme + (f", group {section.group_size}" if section.scheme == "int4" else "")
        held = main + (f", group {group}, {'symmetric' if symmetric else 'asymmetric'}" if int4 else "")
        raise ExportError(
            f"hf_vram: the checkpoint is already quantized ({held}); the config asks for {asked}. Converting between "
            "them would round the weights through float: give a quantization section that matches the checkpoint "
            "(or none, and it is taken from the checkpoint), or quantize the float model instead."
        )
    fields = {**section.to_dict(), "scheme": main, "group_size": group, "symmetric": symmetric, "calibration": "none"}
    return QuantizationSection(**fields)


def install_imported_layers(model: nn.Module, imported: dict[str, ImportedLayer], config: VramOptimizationConfig) -> list[str]:
    """Put hf_vram layers holding ``imported`` codes in place of the named layers.

    ``config.quantization`` must describe the checkpoint (or be off): re-quantizing to another scheme would be a
    float round trip, so it is refused with the fix. ``config`` (the caller's copy) then holds the checkpoint's
    scheme, and its state the per-layer schemes and the scale storage, so a saved model reloads them as they are.
    Returns the converted names.
    """
    section = _checkpoint_section(imported, config.quantization)
    if config.pruning.enabled:
        raise ExportError("hf_vram: pruning needs the float weights; prune the float model, or drop the pruning section.")
    if config.fusion.enabled and config.fusion.projections:
        raise ExportError(
            "hf_vram: fusing q/k/v or gate/up projections of an imported quantized checkpoint is not supported; set "
            "fusion.projections: false (fused norms and the attention still apply)."
        )
    config.quantization = section
    config.state.layer_schemes = {n: i.scheme for n, i in imported.items() if i.scheme != section.scheme} or None
    # hf_vram's int4 convention is bfloat16 scales with zero = bf16((8 - zp) * scale); scales bfloat16 cannot hold
    # exactly (float32/float16 checkpoints) keep float32 storage, with the zero computed exactly.
    if any(i.scheme == "int4" and not bfloat16_exact(i.tensors["scales_zeros"][..., 0]) for i in imported.values()):
        config.state.scale_dtype = "float32"
    scale_dtype = getattr(torch, section.scale_dtype)
    for name, item in imported.items():
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        layer = make_layer(_LinearShape(module), section, device, item.scheme)
        tensors = {k: v.to(device) for k, v in item.tensors.items()}
        if "scales_zeros" in tensors:
            tensors["scales_zeros"] = tensors["scales_zeros"].to(scale_dtype)
        bias = item.bias if item.bias is not None else getattr(module, "bias", None)
        install_layer(model, name, layer, tensors, bias)
    return sorted(imported)


class _LinearShape(nn.Linear):
    """The shape of a compressed linear layer for ``make_layer`` (its ``weight`` may be packed or absent)."""

    def __init__(self, module: nn.Linear) -> None:  # noqa: D107 - no parameters are allocated
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.bias = getattr(module, "bias", None)
