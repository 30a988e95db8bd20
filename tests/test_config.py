"""VramOptimizationConfig: validation, round trips, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_vram
from hf_vram import VramOptimizationConfig
from hf_vram.config.sections import SECTIONS
from hf_vram.presets import available_presets, preset_path


def test_dict_round_trip_is_exact():
    cfg = VramOptimizationConfig(
        quantization={"scheme": "int4", "group_size": 64, "symmetric": True, "modules_to_not_convert": ["lm_head"]},
        pruning={"head_ratio": 0.3},
    )
    data = cfg.to_dict()
    assert data["quant_method"] == "hf_vram"
    again = VramOptimizationConfig.from_dict(data)
    assert again == cfg and again.to_dict() == data
    assert again.quantization.group_size == 64 and again.pruning.head_ratio == 0.3


def test_yaml_round_trip(tmp_path):
    cfg = VramOptimizationConfig(quantization={"scheme": "int8", "quantize_embeddings": True})
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert VramOptimizationConfig.from_yaml(path) == cfg


@pytest.mark.parametrize("name", available_presets())
def test_presets_load(name):
    cfg = VramOptimizationConfig.from_preset(name)
    assert cfg.enabled_sections  # every preset turns at least one technique on
    assert VramOptimizationConfig.from_yaml(cfg.to_yaml()) == cfg


def test_presets_present():
    assert {"int8", "int4", "w8a8", "pruned", "int4-pruned", "fused", "serving", "long-context", "long-context-int2"} <= set(
        available_presets()
    )
    assert VramOptimizationConfig.from_preset("int4-pruned").enabled_sections == ["quantization", "pruning"]
    assert VramOptimizationConfig.from_preset("serving").enabled_sections == ["quantization", "fusion", "kv_cache"]
    assert VramOptimizationConfig.from_preset("int4").quantization.group_size == 128


def test_the_repository_configs_are_the_shipped_presets():
    """``configs/`` links to the package's presets (one file each, so the two cannot drift apart), and every preset
    is there."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    yamls = sorted(configs.glob("*.yaml"))
    assert sorted(p.stem for p in yamls) == available_presets()
    for path in yamls:
        assert path.is_symlink() and path.resolve() == preset_path(path.stem).resolve(), path.name


BAD = [
    ({"quantization": {"scheme": "int3"}}, "quantization.scheme='int3'"),
    ({"quantization": {"scheme": "int4", "group_size": 0}}, "group_size=0"),
    ({"quantization": {"scheme": "int4", "group_size": -64}}, "group_size=-64"),
    ({"quantization": {"scheme": "int4", "group_size": 100}}, "group_size=100"),
    ({"quantization": {"scheme": "int4", "group_size": True}}, "group_size=True"),
    ({"quantization": {"scheme": "nf4"}}, "'nf4' only with backend='bitsandbytes'"),
    ({"quantization": {"backend": "gptq"}}, "backend='gptq'"),
    ({"quantization": {"compute_dtype": "float64"}}, "compute_dtype='float64'"),
    ({"quantization": {"modules_to_not_convert": "lm_head"}}, "modules_to_not_convert='lm_head'"),
    ({"quantization": {"modules_to_not_convert": ["(unclosed"]}}, "a valid regular expression"),
    ({"quantization": {"symmetric": "yes"}}, "symmetric='yes'"),
    ({"quantization": {"bits": 4}}, "unknown key(s) ['bits']"),
    ({"pruning": {"head_ratio": 1.0}}, "head_ratio=1.0"),
    ({"pruning": {"mlp_ratio": -0.1}}, "mlp_ratio=-0.1"),
    ({"pruning": {"head_ratio": float("nan")}}, "head_ratio=nan"),
    ({"pruning": {"method": "oracle"}}, "method='oracle'"),
    ({"kv_cache": {"block_size": 12}}, "a power of two"),
    ({"kv_cache": {"num_blocks": 0}}, "num_blocks=0"),
    ({"kv_cache": {"step_prefill_tokens": 0}}, "step_prefill_tokens=0"),
    ({"recovery": {"temperature": 0}}, "temperature=0"),
    ({"recovery": {"alpha": 1.5}}, "alpha=1.5"),
    ({"speculation": {}}, "unknown section(s) ['speculation']"),
    ({"quantization": "int8"}, "section 'quantization' is a str"),
    ({"format_version": 99}, "saved by a newer hf_vram"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        VramOptimizationConfig(**kwargs)
    assert message in str(err.value)


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("quantization: [scheme: int8\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        VramOptimizationConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="no YAML file"):
        VramOptimizationConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="no preset named 'int5'"):
        VramOptimizationConfig.from_preset("int5")


def test_every_setting_documents_itself():
    for cls in SECTIONS.values():
        helps = cls.help()
        assert helps and all(len(text) > 10 for text in helps.values()), cls.__name__


def test_format_1_decisions_move_into_the_state():
    """A checkpoint saved before the state existed kept hf_vram's decisions inside the sections: they load into it."""
    old = {
        "quant_method": "hf_vram",
        "format_version": 1,
        "quantization": {"scheme": "int4", "calibration": "awq", "act_scale_layers": ["a"], "scale_dtype": "float32"},
        "pruning": {"enabled": True, "plan": {"heads": {"0": [1]}}},
        "planner": {"plan": {"budget_bytes": 1}},
    }
    config = VramOptimizationConfig(**old)
    assert config.state.act_scale_layers == ["a"] and config.quantization.has_act_scales("a")
    assert not config.quantization.has_act_scales("b")
    assert config.quantization.scale_dtype == "float32" and config.pruning.plan == {"heads": {"0": [1]}}
    assert config.planner.plan == {"budget_bytes": 1}
    saved = config.to_dict()
    assert saved["format_version"] == 2 and "plan" not in saved["pruning"] and "act_scale_layers" not in saved["quantization"]
    assert VramOptimizationConfig(**saved) == config


def test_the_doors_leave_the_callers_config_as_given(tiny_dirs):
    """Both doors record their decisions in a copy that the model keeps; the caller's object does not change."""
    from transformers import AutoModelForCausalLM

    config = VramOptimizationConfig(quantization={"scheme": "int8"}, pruning={"head_ratio": 0.5, "method": "magnitude"})
    before = config.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config)
    optimized = hf_vram.optimize(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config)
    assert config.to_dict() == before and config.state.pruning_plan is None
    for model in (loaded, optimized):
        assert model.config.quantization_config is not config
        assert model.config.quantization_config.state.pruning_plan["heads"]


def test_int4_int2_window_sizes_are_whole_key_groups_and_reach_every_reader():
    """``kv_cache.sink_tokens`` / ``recent_tokens``: whole key groups of 64 or refused naming the fix; what they set
    is what the allocator keeps (tests/kvcache), what admission counts per request and what the estimate counts."""
    from transformers import LlamaConfig

    from hf_vram.config.sections import KEY_GROUP_TOKENS
    from hf_vram.kvcache.continuous import window_tokens
    from hf_vram.kvcache.kivi import GROUP, window_policy

    assert KEY_GROUP_TOKENS == GROUP
    with pytest.raises(ValueError, match="recent_tokens=100 is invalid; allowed: null or a multiple of 64"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "recent_tokens": 100})
    with pytest.raises(ValueError, match="sink_tokens=-64"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "sink_tokens": -64})
    configs = {
        "default": hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4"}),
        "long": hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "sink_tokens": 64, "recent_tokens": 64}),
        "wide": hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "recent_tokens": 256}),
    }
    assert window_policy(4).window_groups == 1 and window_policy(2).window_groups == 5  # the defaults
    assert [window_policy(4, c.kv_cache).window_groups for c in configs.values()] == [1, 3, 5]
    model = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=256)
    admitted, estimated = [], []
    for config in configs.values():
        model.quantization_config = config
        admitted.append(window_tokens(model, "int4", 64))
        estimated.append(hf_vram.estimate(model, config, seq_len=512).kv_cache_bytes)
    assert admitted == sorted(set(admitted)) and estimated == sorted(set(estimated))  # strictly growing
