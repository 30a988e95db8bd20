"""VramOptimizationConfig: validation, round trips, presets, registration."""

from __future__ import annotations

import importlib

import pytest
from transformers.quantizers import auto as quantizer_auto

import hf_vram
from hf_vram import VramOptimizationConfig
from hf_vram.presets import available_presets


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
    assert {"int8", "int4", "w8a8", "pruned", "int4-pruned", "fused", "serving"} <= set(available_presets())
    assert VramOptimizationConfig.from_preset("int4-pruned").enabled_sections == ["quantization", "pruning"]
    assert VramOptimizationConfig.from_preset("serving").enabled_sections == ["quantization", "fusion", "kv_cache"]
    assert VramOptimizationConfig.from_preset("int4").quantization.group_size == 128


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


def test_registered_and_reimport_safe():
    assert quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hf_vram"] is VramOptimizationConfig
    importlib.reload(importlib.import_module("hf_vram.hf.registration")).install()
    importlib.reload(hf_vram)  # a notebook re-running `import hf_vram` must not hit the duplicate check
    assert "hf_vram" in quantizer_auto.AUTO_QUANTIZER_MAPPING


IMPORT_PROBE = """
import sys, time
t = time.perf_counter()
import hf_vram
seconds = time.perf_counter() - t
heavy = [m for m in ("transformers.quantizers.auto", "transformers.modeling_utils", "peft", "bitsandbytes",
                     "transformers.trainer", "torch._inductor.compile_fx") if m in sys.modules]
from transformers import AutoModelForCausalLM, AttentionInterface
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
registered = "hf_vram" in AUTO_QUANTIZER_MAPPING and {"hf_vram", "hf_vram_paged"} <= set(AttentionInterface._global_mapping)
lazy = hf_vram.DistillationCallback.__module__
print("RESULT", heavy, registered, lazy, "peft" in sys.modules)
"""


def test_import_is_quiet_light_and_registers_when_transformers_needs_it():
    """`import hf_vram` prints nothing, loads no quantizer registry, model code, Trainer, PEFT or bitsandbytes; the
    registries get hf_vram's entries the moment Transformers imports them; the recovery names load on first use."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "RESULT [] True hf_vram.recovery.distillation True"
    quiet = subprocess.run([sys.executable, "-c", "import hf_vram"], capture_output=True, text=True, cwd=root,
                           env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


