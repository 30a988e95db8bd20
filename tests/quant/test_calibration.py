"""Calibrated quantization: AWQ scales (folded where the math allows), GPTQ, and both; exact folding; reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.quant import awq, schemes
from hf_vram.quant.gptq import HessianAccumulator, Int4Grid, Int8Grid, gptq
from hf_vram.quant.linear import Int4Linear, QuantLinear
from tests.tiny_models import build_tiny

CALIBRATION = torch.randint(3, 320, (16, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(3, 320, (8, 64), generator=torch.Generator().manual_seed(1))


def _outlier_inputs(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, :4] *= 30  # a few loud input channels, as in real LLM activations
    return x


def test_awq_search_beats_plain_quantization_on_outlier_channels():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x = _outlier_inputs(512, 128)
    layer = Int4Linear(128, 64, False, group_size=64, scale_search="none")
    s = awq.search_group_scales([layer], [w], x, x.abs().mean(0))
    plain = layer.dequantize_from(layer._quantize(w))
    scaled = layer.dequantize_from(layer._quantize(w * s[None, :])) / s[None, :]
    err_plain = (x @ plain.t() - x @ w.t()).pow(2).mean()
    err_scaled = (x @ scaled.t() - x @ w.t()).pow(2).mean()
    assert err_scaled < 0.8 * err_plain


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_gptq_lowers_the_layer_output_error_below_plain_rounding(scheme):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=g)
    x = _outlier_inputs(1024, 128, seed=3) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g))  # correlated
    acc = HessianAccumulator(128)
    acc.add(x)
    if scheme == "int4":
        grid = Int4Grid.for_weight(w, 32, symmetric=False, scale_search="none")
        plain = torch.stack([grid.quantize(w[:, j], j)[1] for j in range(128)], dim=1)
        codes = gptq(w, acc.hessian(), grid)
        w_gptq = torch.stack([(codes[:, j] - 8) * grid.scale[:, j // 32] + grid.zero[:, j // 32] for j in range(128)], 1)
    else:
        grid = Int8Grid.for_weight(w)
        plain = torch.round(w / grid.scales[:, None]).clamp(-127, 127) * grid.scales[:, None]
        w_gptq = gptq(w, acc.hessian(), grid) * grid.scales[:, None]
    err_plain = (x @ plain.t() - x @ w.t()).pow(2).mean()
    err_gptq = (x @ w_gptq.t() - x @ w.t()).pow(2).mean()
    assert err_gptq < 0.7 * err_plain


def _held_out_error(model: torch.nn.Module, reference: torch.Tensor) -> float:
    with torch.inference_mode():
        out = model(HELD_OUT).logits
    return ((out - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gptq_beats_plain_rounding_and_awq_alone_on_the_same_calibration(arch):
    model = build_tiny(arch)
    with torch.inference_mode():
        reference = model(HELD_OUT).logits
    errors = {}
    for calibration in ("none", "awq", "gptq", "awq+gptq"):
        cfg = {"quantization": {"scheme": "int4", "group_size": 32, "calibration": calibration, "scale_search": "none"}}
        errors[calibration] = _held_out_error(hf_vram.optimize(copy.deepcopy(model), cfg, CALIBRATION), reference)
    assert errors["gptq"] < errors["none"] and errors["gptq"] < errors["awq"]
    assert errors["awq+gptq"] < errors["none"] and errors["awq+gptq"] < errors["awq"]


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3", "mistral"])
def test_folding_scales_leaves_the_float_model_unchanged(arch):
    """Folding ``1/s`` into each producer while the consumers take ``W * s`` must compute the same function."""
    from hf_vram.quant.select import select_targets
    from hf_vram.quant.sequential import decoder_blocks

    model = build_tiny(arch)
    if arch == "llama":  # fused qkv / gate-up too
        hf_vram.optimize(model, {"fusion": {"enabled": True, "attention": "none"}})
    with torch.inference_mode():
        reference = model(HELD_OUT).logits
    names = select_targets(model, None, False).linears
    container, blocks = decoder_blocks(model, names)
    folded = 0
    g = torch.Generator().manual_seed(4)
    for index, block in enumerate(blocks):
        block_name = f"{container}.{index}"
        groups = awq.scale_groups(model, block_name, block, [n for n in names if n.startswith(block_name + ".")])
        for group in groups:
            if group.fold_into is None:
                continue
            first = model.get_submodule(group.layers[0])
            s = torch.rand(first.in_features, generator=g) * 3 + 0.2
            awq.fold(model, group, s)
            with torch.no_grad():
                for name in group.layers:
                    model.get_submodule(name).weight.mul_(s[None, :])
            folded += 1
    assert folded >= 2 * len(blocks)  # at least the two norms of every block
    with torch.inference_mode():
        assert ((model(HELD_OUT).logits - reference).norm() / reference.norm()) < 1e-4


def test_calibrated_save_reloads_bit_identically_with_only_the_needed_buffers(tmp_path):
    model = hf_vram.optimize(
        build_tiny("llama"), {"quantization": {"scheme": "int4", "group_size": 32, "calibration": "awq+gptq"}}, CALIBRATION
    )
    section = model.config.quantization_config.quantization
    assert section.state.act_scale_layers == []  # Llama: every scale folded (o_proj under GQA: none)
    assert not any(getattr(m, "act_scales", None) is not None for m in model.modules() if isinstance(m, QuantLinear))
    with torch.inference_mode():
        out = model(HELD_OUT).logits
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.inference_mode():
        assert torch.equal(again(HELD_OUT).logits, out)


def test_runtime_scales_where_nothing_can_absorb_them(tmp_path):
    """GPT-2 has no folding table: its layers divide their inputs by saved scales, listed in the config."""
    model = hf_vram.optimize(build_tiny("gpt2"), {"quantization": {"scheme": "int8", "calibration": "awq"}}, CALIBRATION)
    layers = model.config.quantization_config.state.act_scale_layers
    assert layers and all(model.get_submodule(n).act_scales is not None for n in layers)
    model.save_pretrained(tmp_path / "gpt2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    with torch.inference_mode():
        assert torch.equal(again(HELD_OUT).logits, model(HELD_OUT).logits)


def test_asymmetric_int4_zero_points_are_integers():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(5)) ** 3
    _, sz = schemes.quantize_int4(w, 64, symmetric=False, scale_search="clip")
    scale, zero = sz[..., 0].float(), sz[..., 1].float()
    zero_point = 8.0 - zero / scale
    assert (zero_point - zero_point.round()).abs().max() < 0.02
    assert zero_point.round().min() >= 0 and zero_point.round().max() <= 15
