"""The budget planner: plans fit, beat uniform schemes on SmolLM2, reload as planned, and refuse the impossible."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import hf_vram
from hf_vram.config import parse_bytes
from hf_vram.data import default_calibration_ids
from hf_vram.evaluation import perplexity
from hf_vram.planner.estimate import context_bytes
from hf_vram.quant.linear import QuantLinear

CHUNKS = (None, 4096, 2048, 1024, 512)
IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _schemes(model) -> dict[str, str]:
    return {n: m.scheme for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_planned_tiny_model_fits_saves_and_reloads_with_its_mix(tiny_dirs, tmp_path, capsys):
    float_bytes = hf_vram.memory_report(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])).total
    config = hf_vram.VramOptimizationConfig(target_memory=int(0.3 * float_bytes))
    calibration = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = hf_vram.optimize(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, calibration)
    assert hf_vram.memory_report(model).total <= 0.3 * float_bytes
    assert config.planner.plan is None and config.state.layer_schemes is None  # the caller's config stays as given
    carried_out = model.config.quantization_config
    plan = carried_out.planner.plan
    assert plan["measured_bytes"] <= plan["budget_bytes"] and plan["estimated_bytes"] <= plan["budget_bytes"]
    assert set(carried_out.state.layer_schemes.values()) <= {"none", "int8", "int4"}
    assert "hf_vram plan for a budget" in capsys.readouterr().out
    model.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert _schemes(again) == _schemes(model)
    ids = calibration[:1]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("budget", "why"),
    [(1000, "what no plan changes .* alone"), (40_000, r"the smallest plan \(int4 everywhere, 50% of MLP")],
)
def test_nothing_fits_is_a_clear_error_and_leaves_the_model_float(tiny_dirs, budget, why):
    """Below what no plan changes: refused before any calibration pass; above it but below the smallest plan: after."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"nothing fits target_memory=0\.0 MiB: {why}.*needs .* MiB\. Raise target_memory"):
        hf_vram.optimize(model, hf_vram.VramOptimizationConfig(target_memory=budget), torch.randint(3, 300, (2, 16)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("text", "expected"), [("1.5GB", 1_500_000_000), ("600MiB", 600 * 2**20), ("64 MB", 64_000_000), (4096, 4096)]
)
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-5MB", "0GB", 0, 1.5, True, "12 parsecs"])
def test_bad_sizes_name_the_format(bad):
    with pytest.raises(ValueError, match="'1.5GB', '600MiB'"):
        hf_vram.VramOptimizationConfig(target_memory=bad)


def test_planner_refuses_a_fixed_pruning_section():
    config = hf_vram.VramOptimizationConfig(target_memory="1MB", pruning={"mlp_ratio": 0.2})
    from tests.tiny_models import build_tiny

    with pytest.raises(ValueError, match="chooses the pruning itself"):
        hf_vram.optimize(build_tiny("llama"), config, torch.randint(3, 300, (2, 16)))


def _uniform_that_fits(smollm2_dir, budget, layers):
    candidates = [
        {"quantization": {"scheme": "int8", "quantize_embeddings": True}},
        {"quantization": {"scheme": "int4", "quantize_embeddings": True}},
    ]
    candidates += [
        {
            "quantization": {"scheme": "int4", "quantize_embeddings": True},
            "pruning": {"mlp_ratio": dict.fromkeys(range(layers), round(0.05 * k, 2)), "method": "taylor"},
        }
        for k in range(1, 11)
    ]
    return next(c for c in candidates if hf_vram.estimate(smollm2_dir, c, batch=1, seq_len=1).weights_bytes <= budget)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.4, 0.25])  # a budget with a choice (int8/int4 mix), one that forces int4
def test_smollm2_plans_fit_and_beat_the_uniform_scheme_where_they_have_a_choice(smollm2, smollm2_dir, pydoc_ids, fraction):
    base, _ = smollm2
    budget = int(fraction * sum(p.numel() for p in base.parameters()) * 2)  # of the bf16 weight bytes
    calibration = default_calibration_ids(base, 4, 256)
    config = hf_vram.VramOptimizationConfig(target_memory=budget)
    planned = hf_vram.optimize(copy.deepcopy(base), config, calibration)
    assert hf_vram.memory_report(planned).total <= budget
    uniform_config = _uniform_that_fits(smollm2_dir, budget, base.config.num_hidden_layers)
    uniform = hf_vram.optimize(copy.deepcopy(base), uniform_config, calibration)
    assert hf_vram.memory_report(uniform).total <= budget
    ppl_plan, ppl_uniform = perplexity(planned, pydoc_ids), perplexity(uniform, pydoc_ids)
    plan = planned.config.quantization_config.planner.plan
    uniform_ratio = uniform_config.get("pruning", {}).get("mlp_ratio", {0: 0.0})[0]
    same = plan["counts"]["int4"] == sum(plan["counts"].values()) and plan["mlp_ratio"] == uniform_ratio
    if same and "pruning" in uniform_config:  # no choice: the tightest budget forces both to the same int4 plan
        assert ppl_plan == pytest.approx(ppl_uniform, rel=1e-6)
    else:
        assert ppl_plan < ppl_uniform, (fraction, ppl_plan, ppl_uniform, uniform_config)


def test_context_tokens_count_and_the_kv_cache_goes_int8_when_that_is_what_fits(tiny_dirs):
    from hf_vram.kvcache import KVCachePool
    from hf_vram.kvcache.pool import observe_kv_shapes

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    shapes, _, _ = observe_kv_shapes(model)
    kv_int8 = KVCachePool.bytes_per_block_for(shapes, 16, torch.int8) * (4096 // 16)
    activations, kv = context_bytes(model, hf_vram.VramOptimizationConfig(), 4096, CHUNKS, ("auto", "int8"))
    assert kv["int8"] == kv_int8 and kv["auto"] > kv_int8  # the estimate's K/V bytes are the pool's
    least = min(activations.values())  # a tiny model's chunk masks outweigh its MLP: which chunk is the model's
    weights = hf_vram.memory_report(model).total
    target = int(0.6 * weights) + kv_int8 + least
    hf_vram.optimize(model, hf_vram.VramOptimizationConfig(planner={"target_memory": target, "context_tokens": 4096}), IDS)
    config = model.config.quantization_config  # the plan as carried out
    plan = config.planner.plan
    assert plan["kv_dtype"] == "int8" and plan["kv_bytes"] == kv_int8 and plan["activation_bytes"] == least
    assert activations[plan["prefill_chunk"]] == least
    assert config.kv_cache.enabled and config.kv_cache.dtype == "int8"
    assert hf_vram.memory_report(model).total + kv_int8 + least <= target


def _wide_llama():
    """A tiny Llama whose MLP is wide enough that a long prompt's activations, not its chunk masks, dominate."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_the_planner_chunks_the_prefill_before_it_touches_a_weight(tmp_path):
    """Chunking costs no token, so it comes first: a budget that holds the float weights, the float K/V and the
    prefill's activations in chunks of 2048 (not 4096, not one pass) gets exactly that plan, and generate uses it."""
    model = _wide_llama()
    activations, kv = context_bytes(model, hf_vram.VramOptimizationConfig(), 8192, CHUNKS, ("auto", "int8"))
    assert activations[None] > activations[4096] > activations[2048] > activations[512]
    target = hf_vram.memory_report(model).total + kv["auto"] + activations[2048]
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    config = hf_vram.VramOptimizationConfig(planner={"target_memory": target, "context_tokens": 8192})
    hf_vram.optimize(model, config, IDS)
    plan = model.config.quantization_config.planner.plan
    assert plan["counts"]["none"] == sum(plan["counts"].values()) and plan["mlp_ratio"] == 0.0
    assert (plan["kv_dtype"], plan["prefill_chunk"], plan["activation_bytes"]) == ("auto", 2048, activations[2048])
    assert model.config.quantization_config.kv_cache.prefill_chunk == 2048
    assert model.generation_config.prefill_chunk_size == 2048
    model.generation_config.prefill_chunk_size = 8  # the 40-token prompt in five chunks: the same tokens
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)
    model.generation_config.prefill_chunk_size = None
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.generation_config.prefill_chunk_size == 2048  # the kv_cache section sets it on load


def test_a_callers_prefill_chunk_size_stands():
    from hf_vram.config import KVCacheSection
    from hf_vram.kvcache.attach import install_prefill_chunk

    model = _wide_llama()
    model.generation_config.prefill_chunk_size = 256
    install_prefill_chunk(model, KVCacheSection(prefill_chunk=1024))
    assert model.generation_config.prefill_chunk_size == 256


def test_int4_pages_are_planned_for_continuous_batching_and_estimated_alike(tiny_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    activations, kv = context_bytes(model, hf_vram.VramOptimizationConfig(), 4096, CHUNKS, ("int8", "int4"))
    assert kv["int4"] < kv["int8"] / 1.5
    target = hf_vram.memory_report(model).total + kv["int4"] + min(activations.values())
    planner = {"target_memory": target, "context_tokens": 4096, "kv_dtypes": ["int4"]}
    with pytest.raises(ValueError, match=r"windows of 16 tokens fit in the 64-token window.*at least 128"):
        hf_vram.optimize(model, hf_vram.VramOptimizationConfig(planner=planner), IDS)
    long_ids = torch.randint(3, 300, (2, 192), generator=torch.Generator().manual_seed(0))
    hf_vram.optimize(model, hf_vram.VramOptimizationConfig(planner=planner), long_ids)
    config = model.config.quantization_config
    plan = config.planner.plan
    assert plan["kv_dtype"] == "int4" and plan["kv_bytes"] == kv["int4"]
    assert plan["context_options"]["kv"] == {"int4": [kv["int4"], plan["kv_loss_increase"]]}  # what it weighed
    assert config.kv_cache.dtype == "int4" and not config.kv_cache.enabled  # continuous batching's pages
    model.save_pretrained(tmp_path / "m")
    assert hf_vram.estimate(tmp_path / "m", seq_len=4096).kv_cache_bytes == kv["int4"]
    out = model.generate_batch([[5, 6, 7, 8]], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False))
    assert len(next(iter(out.values())).generated_tokens) == 4


@pytest.mark.parametrize("bad", [[], ["int3"], ["int8", "int8"], "int8"])
def test_bad_kv_dtypes_name_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"planner\.kv_dtypes=.*allowed: .*'int4'"):
        hf_vram.VramOptimizationConfig(planner={"target_memory": "1GB", "kv_dtypes": bad})
