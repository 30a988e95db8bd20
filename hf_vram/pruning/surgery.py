"""Apply a ``PruningPlan``: physically shrink q/k/v/o and the MLP, and update the head counts forwards read.

Works on real and on meta tensors alike (``index_select`` on meta only computes shapes), so the same code prunes a
loaded model and rebuilds a pruned checkpoint's shapes inside ``from_pretrained`` before its weights load. The plan
currently applied is kept on the model, so a progressive run can apply a larger plan on top of a smaller one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from hf_vram.pruning.plan import LayerHeads, PruningPlan
from hf_vram.pruning.sites import AttentionSite, MlpSite, attention_sites, mlp_sites

APPLIED_ATTR = "_hf_vram_pruning_plan"


class _ConfigView:
    """A model config seen through per-layer head counts (Phi-3's attention reads them from ``self.config``).

    Every other attribute reads through to the live model config, so later changes (e.g. the attention
    implementation) still reach the module.
    """

    def __init__(self, base, **overrides) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)


def _slice(layer: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep ``index`` of the layer's outputs (``side='out'``) or inputs (``'in'``), in place."""
    if not isinstance(layer, (nn.Linear, Conv1D)):
        raise TypeError(
            f"hf_vram pruning: cannot slice a {type(layer).__name__}; pruning runs on float nn.Linear/Conv1D layers, "
            "before quantization (the pipeline's order); prune the float model."
        )
    conv = isinstance(layer, Conv1D)
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    index = index.to(layer.weight.device)
    weight = layer.weight.data.index_select(dim, index).contiguous()
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if side == "out" and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data.index_select(0, index).contiguous(), requires_grad=layer.bias.requires_grad)
    if conv:
        layer.nf = weight.shape[1]
    else:
        layer.out_features, layer.in_features = weight.shape[0], weight.shape[1]


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)[None, :]
    return idx.flatten() + offset


def shrink_attention(site: AttentionSite, q_local: list[int], kv_local: list[int]) -> None:
    """Keep local query heads ``q_local`` and KV heads ``kv_local`` of one attention module."""
    hd, n_q, n_kv = site.head_dim, site.num_heads, site.num_kv_heads
    if "qkv" in site.proj:
        rows = torch.cat([_rows(q_local, hd), _rows(kv_local, hd, n_q * hd), _rows(kv_local, hd, (n_q + n_kv) * hd)])
        _slice(site.proj["qkv"], rows, "out")
    else:
        _slice(site.proj["q"], _rows(q_local, hd), "out")
        _slice(site.proj["k"], _rows(kv_local, hd), "out")
        _slice(site.proj["v"], _rows(kv_local, hd), "out")
    _slice(site.proj["o"], _rows(q_local, hd), "in")
    new_q, new_kv = len(q_local), len(kv_local)
    module = site.module
    for attr, value in (
        ("num_heads", new_q),
        ("num_attention_heads", new_q),
        ("num_key_value_heads", new_kv),
        ("num_key_value_groups", new_q // new_kv),
        ("split_size", new_q * hd),
        ("all_head_size", new_q * hd),
    ):
        if hasattr(module, attr):
            setattr(module, attr, value)
    config = getattr(module, "config", None)
    if config is not None:
        base = object.__getattribute__(config, "_base") if isinstance(config, _ConfigView) else config
        module.config = _ConfigView(base, num_attention_heads=new_q, num_key_value_heads=new_kv)


def shrink_mlp(site: MlpSite, keep_local: list[int]) -> None:
    index = torch.tensor(keep_local, dtype=torch.long)
    n = site.channels
    for up in site.up:
        _slice(up, torch.cat([index, index + n]) if site.halves else index, "out")
    _slice(site.down, index, "in")
    if hasattr(site.module, "intermediate_size"):
        site.module.intermediate_size = len(keep_local)


def _original_sizes(model: nn.Module) -> PruningPlan:
    """An empty plan holding the model's current sizes (the original sizes, when nothing is applied yet)."""
    plan = PruningPlan()
    for s in attention_sites(model):
        plan.num_heads[s.layer], plan.num_kv_heads[s.layer] = s.num_heads, s.num_kv_heads
    for s in mlp_sites(model):
        plan.channels[s.layer] = s.channels
    return plan


def applied_plan(model: nn.Module) -> PruningPlan:
    """The plan already applied to ``model`` (an empty one with its sizes when it is unpruned)."""
    plan = getattr(model, APPLIED_ATTR, None)
    return plan if plan is not None else _original_sizes(model)


def _kept_heads(plan: PruningPlan, layer: int) -> LayerHeads:
    if layer in plan.heads:
        return plan.heads[layer]
    return LayerHeads(list(range(plan.num_heads[layer])), list(range(plan.num_kv_heads[layer])))


def _local(new: list[int], current: list[int], where: str) -> list[int]:
    position = {orig: i for i, orig in enumerate(current)}
    missing = [i for i in new if i not in position]
    if missing:
        raise ValueError(f"hf_vram pruning: {where} keeps {missing}, which an earlier step already removed.")
    return [position[i] for i in new]


def apply_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Shrink ``model`` to ``plan`` (original indices), on top of whatever plan it already carries."""
    plan.validate()
    current = applied_plan(model)
    base_sizes = (current.num_heads, current.num_kv_heads, current.channels)
    for name, ours, theirs in zip(
        ("heads", "KV heads", "channels"), base_sizes, (plan.num_heads, plan.num_kv_heads, plan.channels), strict=True
    ):
        for layer, n in theirs.items():
            if layer not in ours:
                raise ValueError(
                    f"hf_vram pruning: the plan names layer {layer}, which this model does not have "
                    f"(it has {len(ours)} prunable layers); the plan belongs to another model."
                )
            if ours[layer] != n:
                raise ValueError(
                    f"hf_vram pruning: the plan expects {n} {name} in layer {layer}, the model has {ours[layer]}; "
                    "the plan belongs to another model or architecture."
                )
    attn = {s.layer: s for s in attention_sites(model)}
    for layer, heads in plan.heads.items():
        now = _kept_heads(current, layer)
        if heads.q_heads == now.q_heads and heads.kv_heads == now.kv_heads:
            continue
        where = f"attention layer {layer}"
        shrink_attention(attn[layer], _local(heads.q_heads, now.q_heads, where), _local(heads.kv_heads, now.kv_heads, where))
    mlps = {s.layer: s for s in mlp_sites(model)}
    for layer in plan.mlp_removed:
        now = current.kept_channels(layer)
        new = plan.kept_channels(layer)
        if new != now:
            shrink_mlp(mlps[layer], _local(new, now, f"MLP layer {layer}"))
    setattr(model, APPLIED_ATTR, plan)
