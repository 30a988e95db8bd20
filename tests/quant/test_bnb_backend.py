"""backend: bitsandbytes hands NF4 / LLM.int8 to bitsandbytes' own layers, behind the hf_vram config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from tests.tiny_models import build_tiny, sample_ids

EXPECTED = {"nf4": ("Linear4bit", 0.25), "int8": ("Linear8bitLt", 0.03)}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("scheme", list(EXPECTED))
def test_bitsandbytes_backend_load_save_reload_dequantize(arch, scheme, tiny_dirs, tmp_path):
    layer_type, tol = EXPECTED[scheme]
    cfg = hf_vram.VramOptimizationConfig(quantization={"scheme": scheme, "backend": "bitsandbytes"})
    ids = sample_ids()
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])(ids).logits
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], quantization_config=cfg)
        out = model(ids).logits
    types = {type(m).__name__ for m in model.modules()}
    assert layer_type in types
    assert ((out - ref).norm() / ref.norm()) < tol
    model.save_pretrained(tmp_path / "bnb")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    assert isinstance(again.config.quantization_config, hf_vram.VramOptimizationConfig)
    assert again.config.quantization_config.quantization.backend == "bitsandbytes"
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, out)
    plain = again.dequantize()
    assert layer_type not in {type(m).__name__ for m in plain.modules()}


def test_optimize_refuses_bitsandbytes_backend_with_the_fix():
    model = build_tiny("llama")
    with pytest.raises(NotImplementedError, match="from_pretrained"):
        hf_vram.optimize(model, {"quantization": {"scheme": "nf4", "backend": "bitsandbytes"}})


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_4bit_layers_unfit_for_the_avx512bf16_packing_take_the_generic_path(arch, tiny_dirs, monkeypatch):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first forward, which fails for some shapes.

    Simulated on any CPU by reporting AVX512-BF16 to bitsandbytes: every layer left on the packed path must repack
    without error, and every layer that cannot repack must have been routed to the generic path at load.
    """
    import copy

    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    cfg = hf_vram.VramOptimizationConfig(quantization={"scheme": "nf4", "backend": "bitsandbytes"})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], quantization_config=cfg)
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    kept = {n: m for n, m in layers.items() if m.support_avx512bf16_for_cpu}
    routed = {n: m for n, m in layers.items() if not m.support_avx512bf16_for_cpu}
    assert kept and routed  # the tiny shapes hold both kinds: 64-wide inputs fit, 96-wide (down_proj / fc2) do not
    for m in kept.values():
        _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
    for m in routed.values():
        with pytest.raises((RuntimeError, AssertionError)):
            _convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
