"""What compressed-tensors cannot hold, found before the first byte is written: each problem named with its fix."""

from __future__ import annotations

import importlib.util

import torch.nn as nn

from hf_vram.pruning.sites import attention_sites, mlp_sites
from hf_vram.pruning.sparsity import BlockSparseLinear
from hf_vram.quant.linear import QuantLinear

FORMAT = "compressed-tensors"


class ExportError(ValueError):
    """The model holds something the target format cannot express; the message names it and the fix."""


def require_compressed_tensors(action: str) -> None:
    """compressed-tensors is an optional dependency (the ``export`` extra): its absence is named with the fix."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ExportError(
            f"hf_vram: to {action} compressed-tensors checkpoints, install it: pip install 'hf-vram[export]' "
            "(or pip install compressed-tensors)."
        )


def check_exportable(model: nn.Module, quantized: dict[str, QuantLinear]) -> None:
    """Raise ``ExportError`` listing every part of ``model`` the format has no place for (nothing is written)."""
    problems = []
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        problems.append(
            "its layers are bitsandbytes' (quantization.backend: bitsandbytes), which compressed-tensors does not "
            "store; quantize with hf_vram's own int8/int4 layers (backend: hf_vram)"
        )
    scaled = [n for n, m in quantized.items() if m.act_scales is not None]
    if scaled:
        problems.append(
            f"{len(scaled)} layer(s) divide their input by run-time activation scales that could not be folded into "
            f"a preceding norm or projection ({scaled[:3]}); compressed-tensors has no slot for them: quantize with "
            "calibration: gptq (or none), or keep this model in hf_vram's format"
        )
    conv1d = [n for n, m in quantized.items() if getattr(m, "transposed_source", False)]
    if conv1d:
        problems.append(
            f"{len(conv1d)} layer(s) are GPT-2-style Conv1D ({conv1d[:2]}), and compressed-tensors quantizes "
            "nn.Linear layers only; keep this model in hf_vram's format"
        )
    int4 = {n: m for n, m in quantized.items() if m.scheme == "int4"}
    padded = [n for n, m in int4.items() if m.padded_in_features != m.in_features]
    if padded:
        layer = int4[padded[0]]
        divisors = [g for g in (128, 64, 32) if all(m.in_features % g == 0 for m in int4.values())]
        problems.append(
            f"int4 group {layer.group_size} does not divide the input size of {len(padded)} layer(s) (e.g. "
            f"{padded[0]}: {layer.in_features} inputs, zero-padded by hf_vram); compressed-tensors needs whole "
            f"groups: quantize with group_size {divisors[0] if divisors else 32}"
        )
    if any(isinstance(m, BlockSparseLinear) for m in model.modules()):
        problems.append(
            "it holds block-sparse layers (pruning.sparsity: block16), which the export does not write; prune without sparsity"
        )
    problems += _pruning_problems(model)
    if problems:
        raise ExportError("hf_vram export to compressed-tensors refused, nothing was written: " + "; ".join(problems) + ".")


def _pruning_problems(model: nn.Module) -> list[str]:
    try:
        heads = {(s.num_heads, s.num_kv_heads) for s in attention_sites(model)}
        channels = {s.channels for s in mlp_sites(model)}
    except (NotImplementedError, ValueError, AttributeError):
        return []
    found = []
    if len(heads) > 1:
        found.append(
            f"its attention layers were pruned to different head counts {sorted(heads)}; a Transformers config holds "
            "one count for all layers: prune with one ratio for every layer, or keep hf_vram's format"
        )
    if len(channels) > 1:
        found.append(
            f"its MLPs were pruned to different widths {sorted(channels)[:4]}; a Transformers config holds one "
            "intermediate_size: prune with one ratio for every layer, or keep hf_vram's format"
        )
    return found
