"""compressed-tensors, both ways: export an hf_vram model to it, and take in a model quantized in it.

compressed-tensors is the checkpoint format llm-compressor writes, vLLM serves natively and Transformers loads on
any device. The formats agree where it matters, so the weights cross over exactly, never through float:

* int8 weight-only (per output channel, symmetric): ``pack-quantized`` 8-bit (codes packed four to an int32, the
  format compressed-tensors infers for W8A16), ``weight_scale [N, 1]``.
* W8A8: ``int-quantized``: ``weight`` int8 and ``weight_scale [N, 1]``, activations int8 per token, dynamic.
* int4 group-wise: ``pack-quantized`` 4-bit, ``weight_scale [N, G]``, and for asymmetric groups
  ``weight_zero_point`` packed along the output dimension. hf_vram stores ``(scale, zero = (8 - zp) * scale)`` in
  bfloat16 with an integer ``zp`` (``quant.schemes``): ``zp = 8 - round(zero / scale)`` is recovered exactly, and the
  code ``q`` of hf_vram is compressed-tensors' ``q - 8``.

What has no place in the format is refused by name before anything is written (``ExportError``): run-time
activation scales that could not be folded, int4 layers whose input size the group does not divide (hf_vram
zero-pads them), per-layer pruned shapes, bitsandbytes layers, 2:4/block sparsity. What the format holds
differently is converted: fused q/k/v and gate/up projections are split back into their rows, an int8 embedding
(and the head tied to it) goes out in float (the export prints the bytes it costs), the ``hf_vram`` attention
becomes SDPA, and the pooled KV cache, a run-time feature, stays behind (vLLM pages its own).
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

from hf_vram.quant import schemes
from hf_vram.quant.embedding import Int8Embedding, TiedInt8Head
from hf_vram.quant.linear import Int4Linear, QuantLinear, W8A8Linear

FORMAT = "compressed-tensors"


class ExportError(ValueError):
    """The model holds something the target format cannot express; the message names it and the fix."""


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
        lines = [f"exported to {self.folder} ({FORMAT}): {layers}; {self.bytes_written / 2**20:.1f} MiB written in "
                 f"{self.seconds:.1f} s"]  # fmt: skip
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


# -- export -------------------------------------------------------------------------------------------------------
def export_compressed_tensors(model: nn.Module, folder: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> ExportReport:
    """Write ``model`` (an hf_vram model) as a compressed-tensors checkpoint in ``folder``; see the module docstring.

    ``dtype``: of the float tensors and scales (default: the model's float dtype). Everything is checked before the
    first byte is written, and the folder appears only when complete.
    """
    t0 = time.perf_counter()
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    _check_exportable(model, quantized)
    dtype = dtype or _float_dtype(model)
    split = _split_fused(model, quantized)
    tensors, groups, report = {}, {}, ExportReport(Path(folder))
    for name, layer in split.items():
        scheme = _scheme_key(layer)
        groups.setdefault(scheme, []).append(name)
        report.layers[layer.scheme] = report.layers.get(layer.scheme, 0) + 1
        tensors.update({f"{name}.{k}": v for k, v in _layer_tensors(layer, dtype).items()})
    tensors.update(_float_tensors(model, quantized, dtype, report))
    config = _model_config(model, groups, split, dtype)
    report.notes += _notes(model)
    _write(Path(folder), tensors, config, tokenizer or _tokenizer_of(model), report, model)
    report.seconds = time.perf_counter() - t0
    return report


def _check_exportable(model: nn.Module, quantized: dict[str, QuantLinear]) -> None:
    problems = []
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        problems.append("its layers are bitsandbytes' (quantization.backend: bitsandbytes), which compressed-tensors "
                        "does not store; quantize with hf_vram's own int8/int4 layers (backend: hf_vram)")  # fmt: skip
    scaled = [n for n, m in quantized.items() if m.act_scales is not None]
    if scaled:
        problems.append(f"{len(scaled)} layer(s) divide their input by run-time activation scales that could not be "
                        f"folded into a preceding norm or projection ({scaled[:3]}); compressed-tensors has no slot for "
                        "them: quantize with calibration: gptq (or none), or keep this model in hf_vram's format")  # fmt: skip
    conv1d = [n for n, m in quantized.items() if getattr(m, "transposed_source", False)]
    if conv1d:
        problems.append(f"{len(conv1d)} layer(s) are GPT-2-style Conv1D ({conv1d[:2]}), and compressed-tensors quantizes "
                        "nn.Linear layers only; keep this model in hf_vram's format")  # fmt: skip
    padded = [n for n, m in quantized.items() if isinstance(m, Int4Linear) and m.padded_in_features != m.in_features]
    if padded:
        layer = quantized[padded[0]]
        divisors = [g for g in (128, 64, 32) if all(m.in_features % g == 0 for m in quantized.values()
                                                    if isinstance(m, Int4Linear))]  # fmt: skip
        problems.append(f"int4 group {layer.group_size} does not divide the input size of {len(padded)} layer(s) (e.g. "
                        f"{padded[0]}: {layer.in_features} inputs, zero-padded by hf_vram); compressed-tensors needs "
                        f"whole groups: quantize with group_size {divisors[0] if divisors else 32}")  # fmt: skip
    if any(type(m).__name__ == "BlockSparseLinear" for m in model.modules()):
        problems.append("it holds block-sparse layers (pruning.sparsity: block16), which the export does not write; "
                        "prune without sparsity")  # fmt: skip
    problems += _pruning_problems(model)
    if problems:
        raise ExportError("hf_vram export to compressed-tensors refused, nothing was written: " + "; ".join(problems) + ".")


def _pruning_problems(model: nn.Module) -> list[str]:
    from hf_vram.pruning.sites import attention_sites, mlp_sites

    try:
        heads = {(s.num_heads, s.num_kv_heads) for s in attention_sites(model)}
        channels = {s.channels for s in mlp_sites(model)}
    except (NotImplementedError, ValueError, AttributeError):
        return []
    found = []
    if len(heads) > 1:
        found.append(f"its attention layers were pruned to different head counts {sorted(heads)}; a Transformers config "
                     "holds one count for all layers: prune with one ratio for every layer, or keep hf_vram's format")  # fmt: skip
    if len(channels) > 1:
        found.append(f"its MLPs were pruned to different widths {sorted(channels)[:4]}; a Transformers config holds one "
                     "intermediate_size: prune with one ratio for every layer, or keep hf_vram's format")  # fmt: skip
    return found


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _split_fused(model: nn.Module, quantized: dict[str, QuantLinear]) -> dict[str, QuantLinear]:
    """Quantized layers under their standard names: fused ``qkv_proj``/``gate_up_proj`` split into their rows."""
    from hf_vram.fusion.projections import ProjectionSlice

    out = dict(quantized)
    for name, module in model.named_modules():
        if isinstance(module, ProjectionSlice) and isinstance(module.fused, QuantLinear):
            parent = name.rpartition(".")[0]
            out[name] = _row_slice(module.fused, *module.rows)
            out.pop(f"{parent}.{module.fused_name}", None)
    return out


def _row_slice(layer: QuantLinear, start: int, stop: int) -> QuantLinear:
    """A layer holding rows ``start:stop`` of ``layer`` (rows are independent in every hf_vram format)."""
    piece = copy.copy(layer)
    piece._buffers = dict(layer._buffers)
    piece._parameters = dict(layer._parameters)
    piece.out_features = stop - start
    if isinstance(layer, Int4Linear):
        piece._buffers["qweight"] = layer._saved_qweight()[start:stop]
        piece._buffers["scales_zeros"] = layer.scales_zeros[:, start:stop]
        piece.layout = "packed"
    else:
        codes = layer._codes() if isinstance(layer, W8A8Linear) else layer.qweight
        piece._buffers["qweight"] = codes[start:stop]
        piece._buffers["scales"] = layer.scales[start:stop]
        if isinstance(layer, W8A8Linear):
            piece._packed, piece._packed_handle = None, 0
    if layer.bias is not None:
        piece._parameters["bias"] = nn.Parameter(layer.bias.detach()[start:stop], requires_grad=False)
    return piece


def _weight_args(layer: QuantLinear) -> dict:
    if isinstance(layer, Int4Linear):
        return {"num_bits": 4, "type": "int", "symmetric": layer.symmetric, "strategy": "group",
                "group_size": layer.group_size}  # fmt: skip
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}


def _scheme_key(layer: QuantLinear) -> str:
    args = _weight_args(layer)
    return json.dumps({"weights": args, "w8a8": isinstance(layer, W8A8Linear)}, sort_keys=True)


def _layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out: dict[str, torch.Tensor] = {}
    if isinstance(layer, Int4Linear):
        codes = schemes.unpack_int4(layer._saved_qweight()).to(torch.int16) - 8  # hf_vram 0..15 -> signed -8..7
        sz = layer.scales_zeros.float().transpose(0, 1)  # [N, G, 2]
        scale, zero = sz[..., 0], sz[..., 1]
        out["weight_packed"] = pack_to_int32(codes.to(torch.int8), 4)
        out["weight_scale"] = scale.to(dtype).contiguous()
        out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if not layer.symmetric:
            zero_point = 8.0 - torch.round(zero / scale)  # integer by construction (quant.schemes)
            out["weight_zero_point"] = pack_to_int32((zero_point - 8).to(torch.int8), 4, packed_dim=0)
    else:
        codes = layer._codes() if isinstance(layer, W8A8Linear) else layer.qweight
        scale = layer.scales.float()[:, None].to(dtype)
        if isinstance(layer, W8A8Linear):
            out["weight"] = codes.contiguous()
        else:
            out["weight_packed"] = pack_to_int32(codes.contiguous(), 8)
            out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        out["weight_scale"] = scale.contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype).contiguous()
    return out


def _float_tensors(model: nn.Module, quantized: dict, dtype: torch.dtype, report: ExportReport) -> dict[str, torch.Tensor]:
    """Every tensor that is not a quantized layer's, under Transformers' names; an int8 embedding in float."""
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, TiedInt8Head)):
            skip.update(f"{name}.{k}" for k in (*module._buffers, *module._parameters))
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
                report.float_embedding_bytes = module.num_embeddings * module.embedding_dim * (
                    torch.finfo(dtype).bits // 8 - 1) - module.num_embeddings * 4  # fmt: skip
            continue
        out[key] = value.detach().to(dtype).contiguous() if value.is_floating_point() else value.detach().contiguous()
    if report.float_embedding_bytes:
        report.notes.append(f"the int8 embedding (and the head tied to it) is written in {str(dtype).removeprefix('torch.')}: "
                            f"+{report.float_embedding_bytes / 2**20:.1f} MiB over its int8 bytes; serving engines "
                            "expect a float embedding")  # fmt: skip
    return out


def _model_config(model: nn.Module, groups: dict[str, list[str]], layers: dict, dtype: torch.dtype) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    formats = set()
    for index, (key, names) in enumerate(sorted(groups.items())):
        spec = json.loads(key)
        activations = (QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
                       if spec["w8a8"] else None)  # fmt: skip
        fmt = "int-quantized" if spec["w8a8"] else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=sorted(names), weights=QuantizationArgs(**spec["weights"]), input_activations=activations, format=fmt
        )
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    quant = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                               quantization_status="compressed", ignore=sorted(linear_names))  # fmt: skip
    ct = quant.model_dump()
    ct.update(quant_method="compressed-tensors", version=compressed_tensors.__version__, sparsity_config={},
              transform_config={})  # fmt: skip
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _uniform_pruned_sizes(model, config)
    data = config.to_dict()
    data.pop("_attn_implementation_autoset", None)
    if data.get("attn_implementation") in ("hf_vram", "hf_vram_paged") or data.get("_attn_implementation") in ("hf_vram", "hf_vram_paged"):
        data["attn_implementation"] = "sdpa"
    data.pop("_attn_implementation", None)
    data["dtype"] = str(dtype).removeprefix("torch.")
    data["quantization_config"] = ct
    return data


def _uniform_pruned_sizes(model: nn.Module, config) -> None:
    """A uniformly pruned model's sizes, as a standard config states them (head_dim stays explicit)."""
    from hf_vram.pruning.sites import attention_sites, mlp_sites

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
        notes.append("the pooled KV cache is a run-time feature of hf_vram and is not part of the checkpoint; vLLM pages "
                     "its own KV cache")  # fmt: skip
    if getattr(config, "fusion", None) is not None and config.fusion.enabled:
        notes.append("fused q/k/v and gate/up projections are written as their separate rows, the hf_vram attention as "
                     "SDPA (serving engines fuse in their own kernels)")  # fmt: skip
    return notes


def _tokenizer_of(model: nn.Module):
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not source or not Path(source).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _write(folder: Path, tensors: dict, config: dict, tokenizer, report: ExportReport, model: nn.Module) -> None:
    from safetensors.torch import save_file

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
        (tmp / "README.md").write_text(model_card(folder.name, config, report))
        report.bytes_written = sum(p.stat().st_size for p in tmp.iterdir())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_card(name: str, config: dict, report: ExportReport) -> str:
    groups = config["quantization_config"]["config_groups"]
    schemes_text = "; ".join(
        f"{len(g['targets'])} layers {g['weights']['num_bits']}-bit {g['weights']['strategy']}"
        + (f" {g['weights']['group_size']}" if g["weights"].get("group_size") else "")
        + (" symmetric" if g["weights"]["symmetric"] else " asymmetric")
        + (", int8 activations per token" if g.get("input_activations") else "")
        for g in groups.values()
    )
    notes = "\n".join(f"- {n}" for n in report.notes) or "- nothing: every tensor crossed over as it was."
    return f"""---
library_name: transformers
tags: [compressed-tensors, quantized, hf_vram]
---
# {name}: exported by hf_vram to compressed-tensors

Weights: {schemes_text}; codes and scales as hf_vram computed them (no float round trip).
Loads without hf_vram: Transformers reads compressed-tensors (`pip install compressed-tensors`), and so do vLLM and
SGLang.

```bash
vllm serve ./{name}                 # OpenAI-compatible server; add --tensor-parallel-size N for N GPUs
lm_eval --model hf --model_args pretrained=./{name} --tasks hellaswag,arc_easy
lm_eval --model vllm --model_args pretrained=./{name} --tasks hellaswag,arc_easy
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("./{name}")
```

## What the export changed or left behind
{notes}

To use hf_vram's own kernels, KV pool and fused attention again: `model = AutoModelForCausalLM.from_pretrained(...)`,
then `hf_vram.optimize(model, config)` converts the compressed layers back into hf_vram's, bit for bit.
"""


# -- import -------------------------------------------------------------------------------------------------------
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
    return {n: m for n, m in model.named_modules()
            if getattr(m, "quantization_scheme", None) is not None and isinstance(m, nn.Linear)}  # fmt: skip


def read_compressed_layer(name: str, scheme, state: dict[str, torch.Tensor]) -> ImportedLayer:
    """hf_vram's buffers for one compressed layer (its ``scheme`` and checkpoint ``state``: ``weight_packed``,
    ``weight_scale``, ...), bit for bit; ``ExportError`` for what hf_vram cannot hold."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w, a = scheme.weights, scheme.input_activations
    where = f"compressed-tensors layer {name}"
    if w is None or w.type != "int" or (a is not None and (a.type != "int" or a.num_bits != 8 or a.strategy != "token"
                                                          or not a.dynamic or not a.symmetric)):  # fmt: skip
        raise ExportError(f"hf_vram cannot take {where}: weights {w and w.model_dump(exclude_none=True)}, activations "
                          f"{a and a.model_dump(exclude_none=True)}; it holds integer weights with at most dynamic "
                          "per-token int8 activations (int8, int4, W8A8). Load the float model and quantize it instead.")  # fmt: skip
    if "weight_g_idx" in state:
        raise ExportError(f"hf_vram cannot take {where}: its groups are permuted (activation order 'group', "
                          "weight_g_idx), and hf_vram's groups are contiguous; quantize with actorder 'static'.")  # fmt: skip
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
    raise ExportError(f"hf_vram cannot take {where}: {w.num_bits}-bit {w.strategy} "
                      f"{'symmetric' if w.symmetric else 'asymmetric'} weights; hf_vram holds int8 per channel "
                      "(symmetric) and int4 per group. Load the float model and quantize it instead.")  # fmt: skip


def bfloat16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


def convert_compressed_model(model: nn.Module, config) -> list[str]:
    """Swap every compressed-tensors layer of a model Transformers loaded (still compressed) for hf_vram's layer
    holding the same codes and scales; see ``install_imported_layers``."""
    layers = compressed_layers(model)
    if not layers:
        raise ExportError("hf_vram: this compressed-tensors model holds no compressed linear layers to convert.")
    imported = {name: read_compressed_layer(name, m.quantization_scheme, m.state_dict()) for name, m in layers.items()}
    return install_imported_layers(model, imported, config)


def load_compressed_tensors(folder: str | Path, config=None, auto_class=None, **kwargs):
    """Load a compressed-tensors checkpoint straight into hf_vram's layers, reading the codes from its files.

    This route does not need Transformers' compressed loader (which, in 5.24, cannot load asymmetric int4: it
    builds unpacked zero points for the packed ones the format stores). The float tensors (embedding, norms, layers
    the checkpoint left in float) load through ``from_pretrained``; the quantized ones come from the safetensors
    files as they are. ``config`` (an hf_vram config, dict or preset) then applies its other stages.
    """
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_vram.pipeline import apply_stages, as_config, attach

    folder = Path(folder)
    model_config = AutoConfig.from_pretrained(folder)
    stored = getattr(model_config, "quantization_config", None)
    stored = stored.to_dict() if hasattr(stored, "to_dict") else stored
    if not stored or stored.get("quant_method") != FORMAT:
        raise ExportError(f"hf_vram: {folder} is not a compressed-tensors checkpoint (no quantization_config with "
                          "quant_method 'compressed-tensors' in its config.json).")  # fmt: skip
    del model_config.quantization_config
    cls = auto_class or AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the compressed tensors are read below, not reported as unexpected keys here
    try:
        model = cls.from_pretrained(folder, config=model_config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    ct_config = QuantizationConfig.model_validate({k: v for k, v in stored.items() if k in QuantizationConfig.model_fields})
    apply_quantization_config(model, ct_config, run_compressed=False, show_progress=False)
    names = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None
             and isinstance(m, nn.Linear)]  # fmt: skip
    prefixes = {n: f"{n}." for n in names}
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                owner = key.rpartition(".")[0]
                if owner in prefixes:
                    states[owner][key[len(prefixes[owner]):]] = f.get_tensor(key)
    imported = {n: read_compressed_layer(n, model.get_submodule(n).quantization_scheme, states[n]) for n in names}
    config = as_config(config if config is not None else {})
    install_imported_layers(model, imported, config)
    attach(model, config, apply_stages(model, config))
    return model


def install_imported_layers(model: nn.Module, imported: dict[str, ImportedLayer], config) -> list[str]:
    """Put hf_vram layers holding ``imported`` codes in place of the named layers.

    ``config.quantization`` must describe the checkpoint (or be off, and is then filled in from it): re-quantizing
    to another scheme would be a float round trip, so it is refused with the fix. Returns the converted names.
    """
    from hf_vram.quant.apply import make_layer

    layers = {name: model.get_submodule(name) for name in imported}
    section = config.quantization
    counts: dict[str, int] = {}
    for layer in imported.values():
        counts[layer.scheme] = counts.get(layer.scheme, 0) + 1
    main = max(counts, key=counts.get)
    int4 = {(i.group_size, i.symmetric) for i in imported.values() if i.scheme == "int4"}
    if len(int4) > 1:
        raise ExportError(f"hf_vram: the checkpoint mixes int4 group settings {sorted(int4)}; hf_vram holds one int4 "
                          "group size and symmetry per model.")  # fmt: skip
    group, symmetric = next(iter(int4)) if int4 else (section.group_size, section.symmetric)
    if section.enabled and (section.scheme != main or (int4 and (section.group_size, section.symmetric) != (group, symmetric))):
        raise ExportError(f"hf_vram: the checkpoint is already quantized ({main}"
                          + (f", group {group}, {'symmetric' if symmetric else 'asymmetric'}" if int4 else "")
                          + f"); the config asks for {section.scheme}"
                          + (f", group {section.group_size}" if section.scheme == "int4" else "")
                          + ". Converting between them would round the weights through float: give a quantization "
                          "section that matches the checkpoint (or none, and it is taken from the checkpoint), or "
                          "quantize the float model instead.")  # fmt: skip
    if config.pruning.enabled:
        raise ExportError("hf_vram: pruning needs the float weights; prune the float model, or drop the pruning section.")
    if config.fusion.enabled and config.fusion.projections:
        raise ExportError("hf_vram: fusing q/k/v or gate/up projections of an imported quantized checkpoint is not "
                          "supported; set fusion.projections: false (fused norms and the attention still apply).")  # fmt: skip
    section.scheme, section.group_size, section.symmetric = main, group, symmetric
    section.calibration = "none"
    overrides = {n: i.scheme for n, i in imported.items() if i.scheme != main}
    section.layer_schemes = {**(section.layer_schemes or {}), **overrides} or None
    # hf_vram's int4 convention is bfloat16 scales with zero = bf16((8 - zp) * scale); scales bfloat16 cannot hold
    # exactly (float32/float16 checkpoints) keep float32 storage, with the zero computed exactly.
    if any(i.scheme == "int4" and not bfloat16_exact(i.tensors["scales_zeros"][..., 0]) for i in imported.values()):
        section.scale_dtype = "float32"
    for name, module in layers.items():
        item = imported[name]
        device = next(module.parameters()).device
        layer = make_layer(_LinearShape(module), section, device, item.scheme)
        tensors = dict(item.tensors)
        if "scales_zeros" in tensors:
            tensors["scales_zeros"] = tensors["scales_zeros"].to(getattr(torch, section.scale_dtype))
        layer.load_quantized({k: v.to(device) for k, v in tensors.items()})
        bias = item.bias if item.bias is not None else getattr(module, "bias", None)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        model.set_submodule(name, layer)
    return sorted(layers)


class _LinearShape(nn.Linear):
    """The shape of a compressed linear layer for ``make_layer`` (its ``weight`` may be packed or absent)."""

    def __init__(self, module: nn.Linear) -> None:  # noqa: D107 - no parameters are allocated
        nn.Module.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.bias = getattr(module, "bias", None)
