"""Write an hf_vram model as a compressed-tensors checkpoint (see the package docstring for the mapping).

What the format holds differently is converted: fused q/k/v and gate/up projections are split back into their
rows, an int8 embedding (and the head tied to it) goes out in float (the report gives the bytes it costs), the
``hf_vram`` attention becomes SDPA, and the pooled KV cache, a run-time feature, stays behind (vLLM pages its own).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import AutoTokenizer

from hf_vram.fusion.projections import ProjectionSlice
from hf_vram.interop.compressed_tensors.card import model_card
from hf_vram.interop.compressed_tensors.checks import FORMAT, check_exportable, require_compressed_tensors
from hf_vram.pruning.sites import attention_sites, mlp_sites
from hf_vram.quant import schemes
from hf_vram.quant.embedding import Int8Embedding, TiedInt8Head
from hf_vram.quant.linear import QuantLinear

HF_VRAM_ATTENTION = ("hf_vram", "hf_vram_paged")


@dataclass
class ExportReport:
    folder: Path
    layers: dict[str, int] = field(default_factory=dict)  # scheme -> layers exported
    float_embedding_bytes: int = 0  # what exporting the int8 embedding in float costs, over its int8 bytes
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        layers = ", ".join(f"{n} {s}" for s, n in sorted(self.layers.items()))
        lines = [
            f"exported to {self.folder} ({FORMAT}): {layers}; {self.bytes_written / 2**20:.1f} MiB written in "
            f"{self.seconds:.1f} s"
        ]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def export_compressed_tensors(
    model: nn.Module, folder: str | Path, tokenizer=None, dtype: torch.dtype | None = None
) -> ExportReport:
    """Write ``model`` (an hf_vram model) as a compressed-tensors checkpoint in ``folder``.

    ``dtype``: of the float tensors and scales (default: the model's float dtype). Everything is checked before the
    first byte is written, and the folder appears only when complete.
    """
    t0 = time.perf_counter()
    require_compressed_tensors("write")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    check_exportable(model, quantized)
    dtype = dtype or _float_dtype(model)
    split = _split_fused(model, quantized)
    tensors, groups, report = {}, {}, ExportReport(Path(folder))
    for name, layer in split.items():
        groups.setdefault(_scheme_key(layer), []).append(name)
        report.layers[layer.scheme] = report.layers.get(layer.scheme, 0) + 1
        tensors.update({f"{name}.{k}": v for k, v in _layer_tensors(layer, dtype).items()})
    tensors.update(_float_tensors(model, quantized, dtype, report))
    config = _model_config(model, groups, split, dtype)
    report.notes += _notes(model)
    _write(Path(folder), tensors, config, tokenizer or _tokenizer_of(model), report, model)
    report.seconds = time.perf_counter() - t0
    return report


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _split_fused(model: nn.Module, quantized: dict[str, QuantLinear]) -> dict[str, QuantLinear]:
    """Quantized layers under their standard names: fused ``qkv_proj``/``gate_up_proj`` split into their rows."""
    out = dict(quantized)
    for name, module in model.named_modules():
        if isinstance(module, ProjectionSlice) and isinstance(module.fused, QuantLinear):
            parent = name.rpartition(".")[0]
            out[name] = module.fused.row_slice(*module.rows)
            out.pop(f"{parent}.{module.fused_name}", None)
    return out


def _weight_args(layer: QuantLinear) -> dict:
    if layer.scheme == "int4":
        return {
            "num_bits": 4,
            "type": "int",
            "symmetric": layer.symmetric,
            "strategy": "group",
            "group_size": layer.group_size,
        }
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}


def _scheme_key(layer: QuantLinear) -> str:
    return json.dumps({"weights": _weight_args(layer), "w8a8": layer.scheme == "w8a8"}, sort_keys=True)


def _layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    saved = layer.saved_tensors()
    out: dict[str, torch.Tensor] = {}
    if layer.scheme == "int4":
        codes = schemes.unpack_int4(saved["qweight"]).to(torch.int16) - 8  # hf_vram 0..15 -> signed -8..7
        sz = saved["scales_zeros"].float().transpose(0, 1)  # [N, G, 2]
        scale, zero = sz[..., 0], sz[..., 1]
        out["weight_packed"] = pack_to_int32(codes.to(torch.int8), 4)
        out["weight_scale"] = scale.to(dtype).contiguous()
        out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if not layer.symmetric:
            zero_point = 8.0 - torch.round(zero / scale)  # integer by construction (quant.schemes)
            out["weight_zero_point"] = pack_to_int32((zero_point - 8).to(torch.int8), 4, packed_dim=0)
    else:
        codes = saved["qweight"].contiguous()
        if layer.scheme == "w8a8":
            out["weight"] = codes
        else:
            out["weight_packed"] = pack_to_int32(codes, 8)
            out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        out["weight_scale"] = saved["scales"].float()[:, None].to(dtype).contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype).contiguous()
    return out


def _float_tensors(model: nn.Module, quantized: dict, dtype: torch.dtype, report: ExportReport) -> dict[str, torch.Tensor]:
    """Every tensor that is not a quantized layer's, under Transformers' names; an int8 embedding in float."""
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, TiedInt8Head)):
            skip.update(f"{name}.{k}" for k, _ in module.named_parameters(recurse=False))
            skip.update(f"{name}.{k}" for k, _ in module.named_buffers(recurse=False))
    try:  # a float head tied to the embedding is stored once, under the embedding (Transformers re-ties it)
        skip.update(model.get_expanded_tied_weights_keys(all_submodels=True))
    except (AttributeError, ValueError):
        pass
    out = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        owner = key.rpartition(".")[0]
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, Int8Embedding):
            if key.endswith(".qweight"):
                out[f"{owner}.weight"] = module.dequantize_weight(dtype).contiguous()
                elements = module.num_embeddings * module.embedding_dim
                report.float_embedding_bytes = elements * (dtype.itemsize - 1) - module.num_embeddings * 4
            continue
        out[key] = value.detach().to(dtype).contiguous() if value.is_floating_point() else value.detach().contiguous()
    if report.float_embedding_bytes:
        report.notes.append(
            f"the int8 embedding (and the head tied to it) is written in {str(dtype).removeprefix('torch.')}: "
            f"+{report.float_embedding_bytes / 2**20:.1f} MiB over its int8 bytes; serving engines expect a float "
            "embedding"
        )
    return out


def _model_config(model: nn.Module, groups: dict[str, list[str]], layers: dict, dtype: torch.dtype) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    formats = set()
    for index, (key, names) in enumerate(sorted(groups.items())):
        spec = json.loads(key)
        activations = None
        if spec["w8a8"]:
            activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        fmt = "int-quantized" if spec["w8a8"] else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=sorted(names), weights=QuantizationArgs(**spec["weights"]), input_activations=activations, format=fmt
        )
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    quant = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=sorted(linear_names),
    )
    ct = quant.model_dump()
    ct.update(quant_method=FORMAT, version=compressed_tensors.__version__, sparsity_config={}, transform_config={})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _uniform_pruned_sizes(model, config)
    data = config.to_dict()
    data.pop("_attn_implementation_autoset", None)
    attention = (data.get("attn_implementation"), data.get("_attn_implementation"))
    if any(a in HF_VRAM_ATTENTION for a in attention):
        data["attn_implementation"] = "sdpa"
    data.pop("_attn_implementation", None)
    data["dtype"] = str(dtype).removeprefix("torch.")
    data["quantization_config"] = ct
    return data


def _uniform_pruned_sizes(model: nn.Module, config) -> None:
    """A uniformly pruned model's sizes, as a standard config states them (head_dim stays explicit)."""
    try:
        attention, mlps = attention_sites(model), mlp_sites(model)
    except (NotImplementedError, ValueError, AttributeError):
        return
    if attention:
        site = attention[0]
        if hasattr(config, "num_attention_heads") and site.num_heads != config.num_attention_heads:
            config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            config.num_attention_heads = site.num_heads
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = site.num_kv_heads
    if mlps and hasattr(config, "intermediate_size") and mlps[0].channels != config.intermediate_size:
        config.intermediate_size = mlps[0].channels


def _notes(model: nn.Module) -> list[str]:
    notes = []
    config = model.config.quantization_config
    if getattr(config, "kv_cache", None) is not None and config.kv_cache.enabled:
        notes.append(
            "the pooled KV cache is a run-time feature of hf_vram and is not part of the checkpoint; vLLM pages its own KV cache"
        )
    if getattr(config, "fusion", None) is not None and config.fusion.enabled:
        notes.append(
            "fused q/k/v and gate/up projections are written as their separate rows, the hf_vram attention as SDPA "
            "(serving engines fuse in their own kernels)"
        )
    return notes


def _tokenizer_of(model: nn.Module):
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not source or not Path(source).is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _write(folder: Path, tensors: dict, config: dict, tokenizer, report: ExportReport, model: nn.Module) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.export-"))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            report.notes.append("no tokenizer was found beside the model: pass tokenizer= to include one")
        (tmp / "README.md").write_text(model_card(folder.name, config, report.notes))
        report.bytes_written = sum(p.stat().st_size for p in tmp.iterdir())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
