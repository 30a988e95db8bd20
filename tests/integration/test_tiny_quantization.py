"""int8/int4 through from_pretrained, optimize, save -> fresh-process reload and dequantize, on every tiny family."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import hf_vram
from hf_vram.quant.linear import QuantLinear
from tests.tiny_models import AUTO_CLASS, TINY_ARCHS, sample_ids

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = {
    "int8": ({"scheme": "int8"}, 0.02),
    "int4": ({"scheme": "int4", "group_size": 32}, 0.2),
    "w8a8": ({"scheme": "w8a8"}, 0.05),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(sample_ids()).logits


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_optimize_save_reload_dequantize(arch, scheme, tiny_dirs, tmp_path):
    section, tol = SCHEMES[scheme]
    cfg = hf_vram.VramOptimizationConfig(quantization=section)
    float_model = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch]).eval()
    reference = _logits(float_model)

    loaded = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch], quantization_config=cfg).eval()
    quantized = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert quantized, "no layer was quantized"
    assert not any(isinstance(m, (nn.Linear, Conv1D)) for n, m in loaded.named_modules() if "layers" in n or ".h." in n)
    logits = _logits(loaded)
    assert _rel_err(logits, reference) < tol

    # The in-memory door gives the same tensors as the loading door.
    optimized = hf_vram.optimize(copy.deepcopy(float_model), cfg)
    sd_loaded, sd_optimized = loaded.state_dict(), optimized.state_dict()
    assert sorted(sd_loaded) == sorted(sd_optimized)
    for key, value in sd_loaded.items():
        assert torch.equal(value, sd_optimized[key]), key
    assert torch.equal(_logits(optimized), logits)

    # save -> from_pretrained in a fresh process: bit-identical tensors and logits, no re-quantization.
    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.bin"))
    dump = tmp_path / "dump.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "tests.integration.reload_worker", arch, str(saved), str(dump)],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    fresh = load_file(dump)
    assert torch.equal(fresh["logits"], logits)
    for key, value in sd_loaded.items():
        assert torch.equal(fresh[f"sd.{key}"], value), key

    # dequantize() gives back plain float layers computing the same function.
    plain = loaded.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert not hasattr(plain.config, "quantization_config")
    # W8A8 also quantizes activations, which the dequantized float model does not.
    assert _rel_err(_logits(plain), logits) < (tol if scheme == "w8a8" else 1e-2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_int8_embedding_computes_what_the_float_one_does(arch, tiny_dirs):
    """Every family's embedding (Gemma's scales its rows by sqrt(hidden_size)) and the head tied to it."""
    float_model = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch]).eval()
    cfg = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8", "quantize_embeddings": True})
    loaded = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch], quantization_config=cfg).eval()
    assert loaded.get_input_embeddings().scheme == "int8"
    assert _rel_err(_logits(loaded), _logits(float_model)) < 0.03
