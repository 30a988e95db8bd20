"""Pruning surgery is exact: a pruned model equals the unpruned one with the same heads/channels masked."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_vram.config import PruningSection
from hf_vram.pruning import prune_model
from hf_vram.pruning.sites import attention_sites, in_features, mlp_sites
from tests.tiny_models import TINY_ARCHS, build_tiny, sample_ids


def _zero_inputs(layer, columns: list[int]) -> None:
    """Zero the given input features of a Linear/Conv1D (what removing them computes)."""
    if isinstance(layer, Conv1D):
        layer.weight.data[columns, :] = 0
    else:
        layer.weight.data[:, columns] = 0


def masked_reference(model, plan):
    """The unpruned model with the plan's removed heads and channels zeroed at their output projection."""
    ref = copy.deepcopy(model)
    sites = {s.layer: s for s in attention_sites(ref)}
    for layer, heads in plan.heads.items():
        s = sites[layer]
        gone = [q for q in range(s.num_heads) if q not in heads.q_heads]
        _zero_inputs(s.proj["o"], [q * s.head_dim + d for q in gone for d in range(s.head_dim)])
    mlps = {s.layer: s for s in mlp_sites(ref)}
    for layer, removed in plan.mlp_removed.items():
        _zero_inputs(mlps[layer].down, removed)
    return ref


@pytest.mark.parametrize("method", ["taylor", "activation"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pruned_equals_masked_reference(arch, method):
    model = build_tiny(arch)
    before = {s.layer: (s.num_heads, s.num_kv_heads, in_features(s.proj["o"])) for s in attention_sites(model)}
    channels_before = {s.layer: s.channels for s in mlp_sites(model)}
    reference_model = copy.deepcopy(model)
    section = PruningSection(enabled=True, head_ratio=0.5, mlp_ratio=0.3, method=method)
    plan = prune_model(model, section, sample_ids(4, 16))
    reference = masked_reference(reference_model, plan)

    assert plan.heads, "no head was pruned"
    for s in attention_sites(model):
        n_q, n_kv, o_in = before[s.layer]
        kept = plan.heads[s.layer] if s.layer in plan.heads else None
        assert s.num_heads == (len(kept.q_heads) if kept else n_q)
        assert s.num_kv_heads == (len(kept.kv_heads) if kept else n_kv)
        assert in_features(s.proj["o"]) == s.num_heads * s.head_dim <= o_in
        assert s.num_heads % s.num_kv_heads == 0
    assert sum(s.channels for s in mlp_sites(model)) < sum(channels_before.values())
    for s in mlp_sites(model):
        assert s.channels == channels_before[s.layer] - len(plan.mlp_removed.get(s.layer, []))

    ids = sample_ids(2, 12, seed=5)
    with torch.no_grad():
        ours, ref = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert section.plan is not None and section.plan["heads"]  # the plan is recorded for saving


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "bert"])
def test_pruned_generation_with_cache_equals_masked(arch, cache):
    model = build_tiny(arch)
    reference_model = copy.deepcopy(model)
    plan = prune_model(model, PruningSection(enabled=True, head_ratio=0.5, mlp_ratio=0.25, method="magnitude"))
    reference = masked_reference(reference_model, plan)
    prompt = sample_ids(1, 6, seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation=cache)
    ours = model.generate(prompt, **kwargs)
    ref = reference.generate(prompt, **kwargs)
    assert torch.equal(ours, ref)
    assert ours.shape[1] == 16


def test_gqa_layers_keep_uniform_groups_and_whole_groups_can_go():
    model = build_tiny("llama")
    plan = prune_model(model, PruningSection(enabled=True, head_ratio={"0": 0.5, "1": 0.75}, method="magnitude"))
    for s in attention_sites(model):
        heads = plan.heads[s.layer]
        group = 4 // 2
        per_kv = [sum(1 for q in heads.q_heads if q // group == kv) for kv in heads.kv_heads]
        assert len(set(per_kv)) == 1
    assert len(plan.heads[1].q_heads) == 1 and len(plan.heads[1].kv_heads) == 1  # a whole KV group went
    assert len(plan.heads[0].q_heads) == 2


def test_floor_keeps_heads_in_every_layer():
    model = build_tiny("gpt2")
    plan = prune_model(model, PruningSection(enabled=True, head_ratio=0.9, min_heads_per_layer=2, method="magnitude"))
    assert all(len(h.q_heads) >= 2 for h in plan.heads.values())
    assert all(s.num_heads >= 2 for s in attention_sites(model))


def test_progressive_schedule_reaches_ratio_on_schedule():
    model = build_tiny("gpt2")
    seen = []

    def on_step(m, plan, step):
        seen.append(
            (step, plan.summary()["head_ratio"], plan.summary()["mlp_ratio"], sum(s.num_heads for s in attention_sites(m)))
        )

    section = PruningSection(enabled=True, head_ratio=0.5, mlp_ratio=0.5, steps=4, method="taylor")
    prune_model(model, section, sample_ids(2, 16), on_step=on_step)
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert [s[1] for s in seen] == [0.125, 0.25, 0.375, 0.5]
    assert [s[2] for s in seen] == [0.125, 0.25, 0.375, 0.5]
    assert [s[3] for s in seen] == [7, 6, 5, 4]
