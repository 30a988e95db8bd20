"""LoRA through PEFT on hf_vram's int8/int4/W8A8 layers: train, save, reload, merge; the quantizer is trainable."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.quant.linear import QuantLinear
from hf_vram.recovery import QuantLoraLinear, add_lora, load_lora_adapter
from hf_vram.recovery.lora import MERGE_KEPT_WARNING, merge_kept

SCHEMES = {
    "int8": {"scheme": "int8"},
    "int4": {"scheme": "int4", "group_size": 32},
    "w8a8": {"scheme": "w8a8"},
}


def _load(tiny_dirs, scheme):
    config = hf_vram.VramOptimizationConfig(quantization=SCHEMES[scheme])
    return AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=g)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_lora_trains_saves_reloads_and_merges(tiny_dirs, tmp_path, scheme):
    model = _load(tiny_dirs, scheme)
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_qat_trainable
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    peft_model = add_lora(model, r=4, lora_alpha=8)
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    ids = _batch(model)
    optimizer = bnb.optim.AdamW8bit(trainable, lr=3e-2)  # bitsandbytes' 8-bit optimizer on the CPU
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, b in peft_model.named_buffers():
        if n.endswith("qweight"):
            assert torch.equal(b, frozen[n.replace("base_model.model.", "").replace(".base_layer", "")])

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = load_lora_adapter(_load(tiny_dirs, scheme), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a merge that keeps the update says nothing
        merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, QuantLoraLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)  # still quantized after the merge
    kept = [m.merge_kept for m in merged.modules() if isinstance(m, QuantLinear) and hasattr(m, "merge_kept")]
    assert len(kept) == 14 and min(kept) > MERGE_KEPT_WARNING, kept  # lr 3e-2 moves weights by many steps
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    merge_error = (out - adapted).abs().mean()
    assert merge_error < 0.5 * (base - adapted).abs().mean(), (merge_error, (base - adapted).abs().mean())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_merge_that_rounds_the_update_away_says_so_and_names_the_adapter_route(tiny_dirs, scheme):
    """A short recovery run moves weights by less than half a quantization step; re-quantizing then returns the old
    codes and the merged model silently loses what training won (SmolLM2 int4 g128 after 8 steps: 0.1% kept)."""
    peft_model = add_lora(_load(tiny_dirs, scheme), r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(0)
    for layer in (m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)):
        step = layer.get_base_layer().dequantize_weight().abs().amax() / 127  # finer than any int8 or int4 step
        b = layer.lora_B["default"].weight
        b.data = torch.randn(b.shape, generator=g) * 0.1 * step / layer.scaling["default"]
    with pytest.warns(UserWarning, match=r"took back most of the adapter's update.*load_lora_adapter"):
        merged = peft_model.merge_and_unload()
    kept = [m.merge_kept for m in merged.modules() if isinstance(m, QuantLinear) and hasattr(m, "merge_kept")]
    assert len(kept) == 14 and sorted(kept)[7] < 0.2, kept  # the median layer: rounding noise around nothing kept


def test_merge_kept_measures_the_share_of_the_update_that_landed():
    before, delta = torch.zeros(4, 8), torch.ones(4, 8)
    assert merge_kept(before, before + delta, delta) == pytest.approx(1.0)
    assert merge_kept(before, before, delta) == 0.0
    assert merge_kept(before, before + 0.25 * delta, delta) == pytest.approx(0.25)
    assert merge_kept(before, before - delta, delta) == pytest.approx(-1.0)  # moved against the update
    assert merge_kept(before, before, torch.zeros(4, 8)) == 1.0  # nothing asked, nothing lost


def test_adapter_reload_without_hf_vram_mapping_fails_loudly(tiny_dirs, tmp_path):
    """PEFT alone does not know our layers: the failure names the type, it never loads silently."""
    from peft import PeftModel

    add_lora(_load(tiny_dirs, "int8"), r=2).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="Int8Linear"):
        PeftModel.from_pretrained(_load(tiny_dirs, "int8"), str(tmp_path / "a"))


def test_an_adapter_that_does_not_fit_the_model_is_refused_not_half_loaded(tiny_dirs, tmp_path):
    """An adapter trained on the fused model (qkv_proj, gate_up_proj) onto the unfused one: PEFT alone loads the
    tensors whose layers exist (o_proj, down_proj) and drops the rest without a word; hf_vram refuses it, naming a
    dropped tensor and the fix, and gives the model back without adapter layers. The same adapter onto the model it
    was trained on loads."""
    fused = hf_vram.VramOptimizationConfig(quantization=SCHEMES["int8"], fusion={"enabled": True})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=fused, dtype=torch.float32)
    add_lora(model, r=2, init_lora_weights=False).save_pretrained(tmp_path / "a")
    unfused = _load(tiny_dirs, "int8")
    before = {name: type(m) for name, m in unfused.named_modules()}
    with pytest.raises(ValueError, match=r"does not fit this model: 8 saved tensor.*(qkv_proj|gate_up_proj).*trained on"):
        load_lora_adapter(unfused, str(tmp_path / "a"))
    assert {name: type(m) for name, m in unfused.named_modules()} == before  # no adapter layer left behind
    same = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=fused, dtype=torch.float32)
    assert sum(isinstance(m, QuantLoraLinear) for m in load_lora_adapter(same, str(tmp_path / "a")).modules()) == 8


def test_dora_is_refused_on_quantized_layers(tiny_dirs):
    with pytest.raises(ValueError, match="use_dora=False"):
        add_lora(_load(tiny_dirs, "int8"), r=2, use_dora=True)


def test_pruned_float_model_is_fully_trainable(tiny_dirs):
    """No quantization: the quantizer reports QAT-style full fine-tuning, and the Trainer accepts the bare model."""
    from transformers.trainer_utils import validate_quantization_for_training

    config = hf_vram.VramOptimizationConfig(pruning={"head_ratio": 0.25, "method": "magnitude"})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config)
    assert model.hf_quantizer.is_qat_trainable
    validate_quantization_for_training(model)  # raises for a model that cannot be trained
    quantized = _load(tiny_dirs, "int4")
    with pytest.raises(ValueError, match="attach trainable adapters"):
        validate_quantization_for_training(quantized)
    validate_quantization_for_training(add_lora(quantized, r=2))
