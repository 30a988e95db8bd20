"""Fused models equal unfused ones on every tiny family; fusion composes with pruning, quantization, save/reload."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GPTNeoXConfig

import hf_vram
import hf_vram.fusion.attention as fused_attention
from hf_vram.fusion import FusedRMSNorm, ProjectionSlice
from hf_vram.fusion.residual import _fused_forward
from hf_vram.quant.linear import QuantLinear
from tests.pruning.test_save_reload import _fresh_reload
from tests.tiny_models import AUTO_CLASS, TINY_ARCHS, build_tiny, sample_ids

FUSE = {"enabled": True, "norms": True, "projections": True, "attention": "hf_vram"}
TOL = dict(atol=1e-5, rtol=1e-5)


def _padded(length=12):
    ids = sample_ids(2, length)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def _valid_logits(model, ids, mask):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return logits[mask.bool()]  # padded rows of a left-padded batch are not compared


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_equals_unfused_in_prefill_and_cached_generation(arch):
    model = build_tiny(arch)
    reference = copy.deepcopy(model)
    hf_vram.optimize(model, {"fusion": FUSE})
    assert model.config._attn_implementation == "hf_vram"
    if arch not in ("gpt2", "opt", "bert", "phi3"):
        assert any(isinstance(m, FusedRMSNorm) for m in model.modules())
    if arch in ("llama", "mistral", "qwen2", "qwen3", "gemma"):  # Llama-shaped decoder layers: add fused into norm
        assert all(
            isinstance(layer.forward, types.MethodType) and layer.forward.__func__ is _fused_forward
            for layer in model.model.layers
        )
    if arch not in ("gpt2", "phi3"):  # those two ship fused qkv already
        assert any(isinstance(m, ProjectionSlice) for m in model.modules())
    ids, mask = _padded()
    torch.testing.assert_close(_valid_logits(model, ids, mask), _valid_logits(reference, ids, mask), **TOL)
    if arch != "bert":
        kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "bert", "opt"])
def test_chunked_lazy_mask_path_matches(arch, monkeypatch):
    """Masks above the size limit are built chunk by chunk from the model's own mask function (padding, the
    sliding window of Mistral, BERT's bidirectional mask): same logits, and the attention saw a LazyMask."""
    monkeypatch.setattr(fused_attention, "MASK_ELEMENTS", 64)
    seen = []
    original = fused_attention.LazyMask.rows

    def spy(self, start, stop):
        seen.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(fused_attention.LazyMask, "rows", spy)
    model = build_tiny(arch)
    reference = copy.deepcopy(model)
    hf_vram.optimize(model, {"fusion": {"enabled": True, "norms": False, "projections": False}})
    ids, mask = _padded(24)  # longer than Mistral's window of 16
    torch.testing.assert_close(_valid_logits(model, ids, mask), _valid_logits(reference, ids, mask), **TOL)
    assert seen and max(seen) < 24  # chunks of query rows, never the whole mask


def test_plain_causal_call_uses_sdpa_is_causal_without_a_mask(monkeypatch):
    monkeypatch.setattr(fused_attention, "MASK_ELEMENTS", 64)
    calls = []
    original = fused_attention._sdpa

    def spy(query, key, value, mask, is_causal, scaling, dropout):
        calls.append((mask is None, is_causal, key.shape[1] < query.shape[1]))
        return original(query, key, value, mask, is_causal, scaling, dropout)

    monkeypatch.setattr(fused_attention, "_sdpa", spy)
    model = build_tiny("llama")
    hf_vram.optimize(model, {"fusion": FUSE})
    with torch.no_grad():
        model(sample_ids(1, 24))
    assert calls and all(c == (True, True, True) for c in calls)  # no mask built, GQA K/V not expanded


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3", "opt", "gpt2"])
def test_fusion_composes_with_quantization_and_reloads(arch, scheme, tiny_dirs, tmp_path):
    quant = {"scheme": scheme, "group_size": 32} if scheme == "int4" else {"scheme": scheme}
    cfg = hf_vram.VramOptimizationConfig(fusion=FUSE, quantization=quant)
    loaded = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch], quantization_config=copy.deepcopy(cfg)).eval()
    optimized = hf_vram.optimize(AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch]).eval(), copy.deepcopy(cfg))
    if arch not in ("gpt2", "phi3"):
        fused = next(m for n, m in loaded.named_modules() if n.endswith("qkv_proj"))
        assert isinstance(fused, QuantLinear)  # one quantized fused weight, not three
    ids = sample_ids()
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(optimized(ids).logits, logits)
    loaded.save_pretrained(tmp_path / "fused")
    (fresh,) = _fresh_reload([(arch, tmp_path / "fused")], tmp_path)
    assert torch.equal(fresh["logits"], logits)
    for key, value in loaded.state_dict().items():
        assert torch.equal(fresh[f"sd.{key}"], value), key


def test_pruning_then_fusion_compose():
    model = build_tiny("qwen2")
    hf_vram.optimize(model, {"pruning": {"enabled": True, "head_ratio": 0.5, "mlp_ratio": 0.25, "method": "magnitude"}})
    reference = copy.deepcopy(model)
    hf_vram.fusion.fuse_model(model, hf_vram.FusionSection(**FUSE))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.rows[1] == attn.o_proj.in_features  # split points follow the pruned shapes
    ids, mask = _padded()
    torch.testing.assert_close(_valid_logits(model, ids, mask), _valid_logits(reference, ids, mask), **TOL)


class OddRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x / x.abs().mean(-1, keepdim=True)


def test_unknown_norm_and_attention_are_refused_by_name():
    model = build_tiny("llama")
    model.model.norm = OddRMSNorm(64)
    with pytest.raises(NotImplementedError, match="OddRMSNorm .*model.norm.*fusion.norms: false"):
        hf_vram.optimize(model, {"fusion": FUSE})
    neox = AutoModelForCausalLM.from_config(
        GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    )
    with pytest.raises(NotImplementedError, match=r"\['GPTNeoXAttention'\].*fusion.projections: false"):
        hf_vram.optimize(neox, {"fusion": FUSE})


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("small_masks", [True, False])
def test_chunked_prefill_gives_the_unchunked_logits_and_tokens(arch, small_masks, monkeypatch):
    """Transformers' ``prefill_chunk_size`` over the hf_vram attention (each chunk attends to its history with its
    own mask, whole or built lazily): the first new token's logits within 1e-5 of one whole prefill, and the same
    greedy tokens (``benchmarks/prefill.py`` measures the same on SmolLM2 at 8192 tokens)."""
    if not small_masks:
        monkeypatch.setattr(fused_attention, "MASK_ELEMENTS", 64)
    model = hf_vram.optimize(build_tiny(arch).float(), {"fusion": {"enabled": True, "norms": False, "projections": False}})
    ids = sample_ids(1, 100)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    whole = model.generate(ids, **kwargs)
    chunked = model.generate(ids, prefill_chunk_size=16, **kwargs)
    torch.testing.assert_close(chunked.logits[0], whole.logits[0], **TOL)
    assert torch.equal(chunked.sequences, whole.sequences)


def test_unpadded_causal_attention_goes_to_sdpa_on_every_device_and_padding_to_the_triton_kernel_on_cuda():
    """SDPA's fused causal kernel beat hf_vram's Triton flash kernel 6.5x at a 7B's 2048-token prefill on an H200, so
    only what SDPA cannot take without a materialised mask (key padding, a full pattern) goes to the Triton kernel."""
    lazy_mask_path = fused_attention.lazy_mask_path
    assert lazy_mask_path("causal", False, 2048, 2048, True, 0.0) == "sdpa causal"
    assert lazy_mask_path("causal", False, 2048, 2048, False, 0.0) == "sdpa causal"
    assert lazy_mask_path("causal", True, 2048, 2048, True, 0.0) == "triton flash"
    assert lazy_mask_path("full", False, 512, 512, True, 0.0) == "triton flash"
    assert lazy_mask_path("causal", False, 16, 2048, True, 0.0) == "triton flash"  # a chunk after a prefix
    assert lazy_mask_path("causal", True, 2048, 2048, False, 0.0) == "chunked sdpa"
    assert lazy_mask_path("causal", True, 2048, 2048, True, 0.1) == "chunked sdpa"  # dropout: not in the kernel
    assert lazy_mask_path("sliding", False, 2048, 2048, True, 0.0) == "chunked sdpa"
