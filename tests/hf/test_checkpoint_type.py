"""A saved hf_vram checkpoint names its own model type: refused loudly where hf_vram is not imported (AutoModel,
``transformers serve``), loaded exactly where it is, and an edited config that lost the architecture's type is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import hf_vram
from hf_vram.assets import smollm2_path
from hf_vram.hf.checkpoint_type import BASE_MODEL_TYPE_KEY, GUARD_MODEL_TYPE
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8"}})
    out = tmp_path_factory.mktemp("guarded") / "int8"
    model.save_pretrained(out)
    return model, out


def test_saved_config_names_the_guard_and_keeps_the_architecture(saved):
    _, out = saved
    stored = json.loads((out / "config.json").read_text())
    assert stored["model_type"] == GUARD_MODEL_TYPE and stored[BASE_MODEL_TYPE_KEY] == "llama"
    config = AutoConfig.from_pretrained(out)
    assert type(config) is LlamaConfig and config.model_type == "llama"
    assert not hasattr(config, BASE_MODEL_TYPE_KEY)


def test_with_hf_vram_the_checkpoint_reloads_exactly_and_saves_the_same_guard(saved, tmp_path):
    model, out = saved
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 320, (1, 9))
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)
    again.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["model_type"] == GUARD_MODEL_TYPE and resaved[BASE_MODEL_TYPE_KEY] == "llama"


def test_a_config_that_lost_the_architecture_type_is_named(saved, tmp_path):
    _, out = saved
    cut = tmp_path / "cut"
    cut.mkdir()
    stored = json.loads((out / "config.json").read_text())
    del stored[BASE_MODEL_TYPE_KEY]
    (cut / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="hf_vram_model_type"):
        AutoConfig.from_pretrained(cut)


def test_transformers_serve_without_hf_vram_refuses_to_serve_it(saved, tmp_path):
    """``transformers serve`` preloads a forced model: in a process without hf_vram it must exit naming hf_vram,
    not answer requests from random weights."""
    _, out = saved
    served = tmp_path / "served"
    served.mkdir()
    for f in out.iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(served)  # serve loads the tokenizer first
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "transformers"), "serve", str(served), "--port", "18731", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        timeout=300,
    )
    assert proc.returncode != 0
    assert GUARD_MODEL_TYPE in proc.stderr + proc.stdout
