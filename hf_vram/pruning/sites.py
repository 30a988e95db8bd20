"""Where heads and channels live in each supported architecture: the pruning wing's arch table.

Transformers 5 removed ``prune_heads``; each family lays out q/k/v/o (and the MLP) differently, so surgery needs
to know, per attention class, which projections carry head rows (q, k, v, or one fused qkv) and which carries head
columns (o), and which module attributes the forward reads for head counts. Classes not in the table are refused
by name; guessing a layout would give silently different math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

# Attention classes whose forward views q/k/v with ``-1`` heads and reads counts only from the attributes set by
# ``set_head_counts`` below.
_SPLIT_QKV = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
ATTENTION_SPECS: dict[str, dict] = {
    "LlamaAttention": {"proj": _SPLIT_QKV},
    "MistralAttention": {"proj": _SPLIT_QKV},
    "Qwen2Attention": {"proj": _SPLIT_QKV},
    "Qwen3Attention": {"proj": _SPLIT_QKV},  # q_norm/k_norm act on head_dim and are shared by all heads
    "GemmaAttention": {"proj": _SPLIT_QKV},
    "Phi3Attention": {"proj": {"qkv": "qkv_proj", "o": "o_proj"}},
    "GPT2Attention": {"proj": {"qkv": "c_attn", "o": "c_proj"}},
    "OPTAttention": {"proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}},
    # BERT's output projection sits beside the attention module, in BertAttention.output.dense.
    "BertSelfAttention": {"proj": {"q": "query", "k": "key", "v": "value", "o": "^output.dense"}},
}
# MLP containers: ``up`` projections lose rows (outputs), ``down`` loses columns (inputs). ``halves`` marks a fused
# [gate; up] weight whose two halves lose the same channels.
MLP_SPECS: dict[str, dict] = {
    "LlamaMLP": {"up": ("gate_proj", "up_proj"), "down": "down_proj"},
    "MistralMLP": {"up": ("gate_proj", "up_proj"), "down": "down_proj"},
    "Qwen2MLP": {"up": ("gate_proj", "up_proj"), "down": "down_proj"},
    "Qwen3MLP": {"up": ("gate_proj", "up_proj"), "down": "down_proj"},
    "GemmaMLP": {"up": ("gate_proj", "up_proj"), "down": "down_proj"},
    "Phi3MLP": {"up": ("gate_up_proj",), "down": "down_proj", "halves": True},
    "GPT2MLP": {"up": ("c_fc",), "down": "c_proj"},
    "OPTDecoderLayer": {"up": ("fc1",), "down": "fc2"},
    "BertLayer": {"up": ("intermediate.dense",), "down": "output.dense"},
}


def out_features(layer: nn.Module) -> int:
    """From the attribute where a layer has one (quantized layers hold no float weight), else the weight."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[1]
    return layer.out_features if hasattr(layer, "out_features") else layer.weight.shape[0]


def in_features(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0]
    return layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[1]


@dataclass
class AttentionSite:
    """One attention module: its projections and current head counts (after any earlier pruning)."""

    layer: int
    name: str
    module: nn.Module
    proj: dict[str, nn.Module]
    proj_names: dict[str, str]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class MlpSite:
    layer: int
    name: str
    module: nn.Module
    up: list[nn.Module]
    down: nn.Module
    halves: bool = False
    up_names: list[str] = field(default_factory=list)
    down_name: str = ""

    @property
    def channels(self) -> int:
        return in_features(self.down)


def _resolve(model: nn.Module, name: str, rel: str) -> tuple[str, nn.Module]:
    if rel.startswith("^"):  # relative to the parent module
        parent = name.rpartition(".")[0]
        path = f"{parent}.{rel[1:]}" if parent else rel[1:]
    else:
        path = f"{name}.{rel}" if name else rel
    return path, model.get_submodule(path)


def _head_counts(module: nn.Module, proj: dict[str, nn.Module]) -> tuple[int, int, int]:
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    o_in = in_features(proj["o"])
    num_heads = o_in // head_dim
    if "qkv" in proj:
        kv_rows = (out_features(proj["qkv"]) - o_in) // 2
        num_kv = kv_rows // head_dim
    else:
        num_kv = out_features(proj["k"]) // head_dim
    return num_heads, num_kv, head_dim


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or type(module).__name__.endswith("CrossAttention")


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    sites = []
    for name, module in model.named_modules():
        spec = ATTENTION_SPECS.get(type(module).__name__)
        if spec is None or _is_cross_attention(module):
            continue
        paths = {role: _resolve(model, name, rel) for role, rel in spec["proj"].items()}
        proj = {role: mod for role, (_, mod) in paths.items()}
        n_q, n_kv, hd = _head_counts(module, proj)
        sites.append(AttentionSite(len(sites), name, module, proj, {r: p for r, (p, _) in paths.items()}, n_q, n_kv, hd))
    return sites


def mlp_sites(model: nn.Module) -> list[MlpSite]:
    sites = []
    for name, module in model.named_modules():
        spec = MLP_SPECS.get(type(module).__name__)
        if spec is None:
            continue
        ups = [_resolve(model, name, rel) for rel in spec["up"]]
        down_name, down = _resolve(model, name, spec["down"])
        sites.append(
            MlpSite(
                len(sites), name, module, [m for _, m in ups], down, spec.get("halves", False), [p for p, _ in ups], down_name
            )
        )
    return sites


def check_supported(model: nn.Module, heads: bool, channels: bool) -> None:
    """Refuse a model whose attention or MLP modules the table does not describe, naming the module class."""
    if heads and not attention_sites(model):
        classes = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise NotImplementedError(
            f"hf_vram pruning: head pruning does not support attention modules {classes or ['(none found)']}; "
            f"supported: {sorted(ATTENTION_SPECS)}. Set pruning.head_ratio: 0 to prune only MLP channels."
        )
    if channels and not mlp_sites(model):
        classes = sorted({type(m).__name__ for m in model.modules() if "MLP" in type(m).__name__ or "Layer" in type(m).__name__})
        raise NotImplementedError(
            f"hf_vram pruning: MLP-channel pruning does not support modules {classes or ['(none found)']}; "
            f"supported: {sorted(MLP_SPECS)}. Set pruning.mlp_ratio: 0 to prune only heads."
        )
