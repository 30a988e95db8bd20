"""Pruning plans: bad ones are refused with a clear error; random ones always give runnable shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPTNeoXConfig

import hf_vram
from hf_vram.config import PruningSection
from hf_vram.pruning import PruningPlan, apply_plan, prune_model
from hf_vram.pruning.scores import Scores
from hf_vram.pruning.selection import select
from hf_vram.pruning.sites import attention_sites
from hf_vram.pruning.surgery import applied_plan
from tests.tiny_models import build_tiny, sample_ids


@pytest.mark.parametrize(
    ("pruning", "message"),
    [
        ({"head_ratio": 1.0}, "pruning.head_ratio=1.0 is invalid"),
        ({"mlp_ratio": -0.2}, "pruning.mlp_ratio=-0.2 is invalid"),
        ({"head_ratio": {"x": 0.2}}, "mapping of layer index"),
        ({"head_ratio": {"0": 1.5}}, "head_ratio[0]=1.5 is invalid"),
        ({"steps": 0}, "pruning.steps=0 is invalid"),
        ({"sparsity": "2:4"}, "pruning.sparsity='2:4' is invalid"),
        ({"method": "fisher"}, "pruning.method='fisher' is invalid"),
    ],
)
def test_bad_pruning_config_is_refused(pruning, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hf_vram.VramOptimizationConfig(pruning={"enabled": True, **pruning})


def test_unknown_layer_in_per_layer_ratios_is_refused():
    model = build_tiny("llama")
    with pytest.raises(ValueError, match=r"names layer '7', which this model does not have; layers are 0\.\.1"):
        prune_model(model, PruningSection(enabled=True, head_ratio={"7": 0.5}, method="magnitude"))


def _plan_for(model) -> PruningPlan:
    return PruningPlan.from_dict(applied_plan(model).to_dict())


def test_plan_pruning_every_head_is_refused_and_model_untouched():
    model = build_tiny("llama")
    plan = _plan_for(model)
    plan.heads[0] = hf_vram.pruning.LayerHeads([], [])
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="every head would be pruned"):
        apply_plan(model, plan)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.heads.__setitem__(0, hf_vram.pruning.LayerHeads([0, 2], [0])), "belongs to a pruned KV head"),
        (lambda p: p.heads.__setitem__(0, hf_vram.pruning.LayerHeads([0, 1, 2], [0, 1])), "different numbers of query heads"),
        (lambda p: p.heads.__setitem__(0, hf_vram.pruning.LayerHeads([0, 9], [0, 1])), "out of range"),
        (lambda p: p.heads.__setitem__(0, hf_vram.pruning.LayerHeads([1, 0], [0])), "sorted and unique"),
        (lambda p: p.mlp_removed.__setitem__(1, list(range(96))), "every channel would be pruned"),
        (lambda p: p.num_heads.__setitem__(5, 4), "names layer 5, which this model does not have"),
        (lambda p: p.channels.__setitem__(0, 128), "expects 128 channels in layer 0, the model has 96"),
    ],
)
def test_inconsistent_plans_are_refused(edit, message):
    model = build_tiny("llama")
    plan = _plan_for(model)
    edit(plan)
    if 5 in plan.num_heads:
        plan.num_kv_heads[5] = 2
    with pytest.raises(ValueError, match=message):
        apply_plan(model, plan)


def test_malformed_saved_plan_is_refused():
    with pytest.raises(ValueError, match="saved pruning plan is malformed"):
        PruningPlan.from_dict({"heads": {"0": {"q": [0]}}})


def test_unsupported_attention_is_refused_by_name():
    config = GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match="GPTNeoXAttention"):
        prune_model(model, PruningSection(enabled=True, head_ratio=0.5, method="magnitude"))


def test_taylor_needs_no_weight_gradients_and_restores_flags():
    model = build_tiny("qwen2")
    flags = [p.requires_grad for p in model.parameters()]
    scores = hf_vram.pruning.compute_scores(model, "taylor", sample_ids(2, 16))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(v.shape == (4,) and (v >= 0).all() and v.sum() > 0 for v in scores.heads.values())
    with pytest.raises(ValueError, match="needs calibration token ids"):
        hf_vram.pruning.compute_scores(model, "activation", None)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_kv=st.sampled_from([1, 2, 3, 4]),
    group=st.sampled_from([1, 2, 3]),
    layers=st.integers(1, 4),
    ratio=st.floats(0.0, 0.95),
    floor=st.integers(1, 3),
)
def test_selection_always_gives_runnable_gqa_plans(data, n_kv, group, layers, ratio, floor):
    n_q = n_kv * group
    plan = PruningPlan(num_heads=dict.fromkeys(range(layers), n_q), num_kv_heads=dict.fromkeys(range(layers), n_kv), channels={})
    scores = Scores(
        {i: torch.tensor(data.draw(st.lists(st.floats(0, 10), min_size=n_q, max_size=n_q))) for i in range(layers)}, {}
    )
    new = select(plan, scores, ratio, 0.0, floor)
    new.validate()  # uniform groups, kept heads inside kept groups, never empty
    total = n_q * layers
    removed = total - sum(len(new.heads[i].q_heads) if i in new.heads else n_q for i in range(layers))
    assert removed <= round(ratio * total)
    for _i, heads in new.heads.items():
        assert len(heads.q_heads) >= min(floor, n_q)


def test_real_model_pruning_is_fast_and_reloads(smollm2, smollm2_dir, pydoc_ids, tmp_path):
    """SmolLM2: Taylor scoring on pydoc text, 20% heads + 10% channels, through from_pretrained; save -> reload."""
    import time

    from hf_vram.evaluation import perplexity

    cfg = hf_vram.VramOptimizationConfig(pruning={"enabled": True, "head_ratio": 0.2, "mlp_ratio": 0.1, "calibration_samples": 4})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, quantization_config=cfg).eval()
    assert time.perf_counter() - t0 < 120
    summary = PruningPlan.from_dict(model.config.quantization_config.pruning.plan).summary()
    assert summary["head_ratio"] == pytest.approx(0.2, abs=0.01) and summary["mlp_ratio"] == pytest.approx(0.1, abs=0.01)
    assert sum(s.num_heads for s in attention_sites(model)) == 270 - summary["heads_removed"]
    ids = pydoc_ids[:1024]
    ppl = perplexity(model, ids)
    assert perplexity(smollm2[0], ids) < ppl < 2.5 * perplexity(smollm2[0], ids)
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.inference_mode():
        assert torch.equal(again(ids[None, :64]).logits, model(ids[None, :64]).logits)


def test_user_calibration_texts(smollm2):
    tokenizer = smollm2[1]
    ids = hf_vram.calibration_ids(tokenizer, ["def f(x):\n    return x * 2\n"] * 40, n_windows=2, window=64)
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    with pytest.raises(ValueError, match="fewer than the 1024 asked for"):
        hf_vram.calibration_ids(tokenizer, "too short", n_windows=2, window=512)


def test_tiny_model_without_tokenizer_names_the_fix(tiny_dirs):
    cfg = hf_vram.VramOptimizationConfig(pruning={"enabled": True, "head_ratio": 0.25, "method": "taylor"})
    with pytest.raises(ValueError, match="calibration_ids=hf_vram.calibration_ids"):
        AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=cfg)
