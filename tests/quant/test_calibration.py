"""AWQ-style calibration: never worse than plain quantization on its inputs, saved and reloaded exactly."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.quant.calibration import search_scales
from hf_vram.quant.linear import Int4Linear
from tests.tiny_models import build_tiny, sample_ids


def test_search_beats_plain_quantization_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # a few loud input channels, as in real LLM activations
    layer = Int4Linear(128, 64, False, group_size=64, scale_search="none")
    s = search_scales(layer, w, x)
    plain = layer.dequantize_from(layer._quantize(w))
    scaled = layer.dequantize_from(layer._quantize(w * s[None, :])) / s[None, :]
    err_plain = (x @ plain.t() - x @ w.t()).pow(2).mean()
    err_scaled = (x @ scaled.t() - x @ w.t()).pow(2).mean()
    assert err_scaled < 0.8 * err_plain


def test_awq_optimize_save_reload(tmp_path):
    model = build_tiny("llama")
    ids = sample_ids(4, 64)
    with torch.inference_mode():
        ref = model(ids).logits
    cfg = {"quantization": {"scheme": "int4", "group_size": 32, "calibration": "awq", "scale_search": "none"}}
    plain_cfg = {"quantization": {"scheme": "int4", "group_size": 32, "scale_search": "none"}}
    awq = hf_vram.optimize(copy.deepcopy(model), cfg, calibration_ids=ids)
    plain = hf_vram.optimize(copy.deepcopy(model), plain_cfg)
    assert awq.model.layers[0].mlp.down_proj.act_scales is not None
    with torch.inference_mode():
        out = awq(ids).logits
        err_awq = (out - ref).norm() / ref.norm()
        err_plain = (plain(ids).logits - ref).norm() / ref.norm()
    assert err_awq <= err_plain * 1.02
    awq.save_pretrained(tmp_path / "awq")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "awq")
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, out)
    dq = again.dequantize()
    with torch.inference_mode():
        assert ((dq(ids).logits - out).norm() / out.norm()) < 1e-2
