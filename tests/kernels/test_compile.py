"""Every hf_vram module compiles with ``torch.compile(fullgraph=True)`` on the CPU and computes what eager computes.

One tiny Llama carries every kind of module at once (to keep compiles few): int8, int4 and W8A8 layers (per-layer
schemes), the int8 embedding and the tied head reading it, fused RMSNorms with the residual add, fused qkv and
gate/up projections, and the ``hf_vram`` attention. GPT-2 adds Conv1D-shaped int8 layers next to LayerNorms.
"""

from __future__ import annotations

import pytest
import torch

import hf_vram
from hf_vram.evaluation import compiled_generate_kwargs
from hf_vram.fusion.projections import ProjectionSlice
from hf_vram.quant.embedding import Int8Embedding, TiedInt8Head
from hf_vram.quant.linear import Int4Linear, Int8Linear, W8A8Linear
from tests.tiny_models import build_tiny, sample_ids

MIXED = {
    "fusion": {"enabled": True},
    "quantization": {
        "scheme": "int8",
        "group_size": 32,
        "quantize_embeddings": True,
        "layer_schemes": {
            "model.layers.0.mlp.gate_up_proj": "int4",
            "model.layers.1.self_attn.qkv_proj": "int4",
            "model.layers.1.mlp.down_proj": "w8a8",
        },
    },
}
# Stated tolerance (relative L2 of the logits, float32 model): inductor reorders the float arithmetic around the
# kernels (norms, RoPE, softmax), and W8A8 re-quantizes its activations per token, so a last-bit difference in an
# activation can move one int8 code.
TOLERANCE = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def mixed_model():
    model = hf_vram.optimize(build_tiny("llama"), MIXED)
    kinds = {type(m) for m in model.modules()}
    assert {Int8Linear, Int4Linear, W8A8Linear, Int8Embedding, TiedInt8Head, ProjectionSlice} <= kinds
    assert model.config._attn_implementation == "hf_vram"
    return model


def test_quantizer_says_compileable(mixed_model):
    assert mixed_model.hf_quantizer.is_compileable


def test_every_module_compiles_fullgraph_and_matches_eager(mixed_model):
    ids = sample_ids(batch=2, length=12)
    with torch.inference_mode():
        eager = mixed_model(ids).logits
        compiled = torch.compile(mixed_model, fullgraph=True)(ids).logits
    assert _rel(compiled, eager) < TOLERANCE


def test_static_cache_generate_compiled_gives_eager_tokens(tiny_dirs):
    from transformers import AutoModelForCausalLM

    section = dict(MIXED["quantization"], layer_schemes={"model.layers.0.mlp.gate_up_proj": "int4"})
    cfg = hf_vram.VramOptimizationConfig(fusion={"enabled": True}, quantization=section)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=cfg).eval()
    ids = sample_ids(batch=2, length=10)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, cache_implementation="static", **kwargs)
    compiled = model.generate(ids, **compiled_generate_kwargs(), **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(compiled, eager)


def test_gpt2_conv1d_layers_compile(tiny_dirs):
    model = hf_vram.optimize(build_tiny("gpt2"), {"quantization": {"scheme": "int8", "quantize_embeddings": True}})
    ids = sample_ids(batch=1, length=9)
    with torch.inference_mode():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert _rel(compiled, eager) < TOLERANCE


def test_pooled_cache_refuses_compiled_decode_with_the_alternative():
    model = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8"}, "kv_cache": {"num_blocks": 16}})
    ids = sample_ids(batch=1, length=5)
    with pytest.raises(ValueError, match="does not compile.*cache_implementation='static'"):
        model.generate(ids, max_new_tokens=2, do_sample=False, compile_config=compiled_generate_kwargs()["compile_config"])
    out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # the pool still serves eager decode
    assert out.shape == (1, 7)


def test_a_generation_config_that_names_a_cache_bypasses_the_pool():
    """`transformers serve --compile` sets the model's generation_config (static cache, compile config): the pooled
    wrapper must step aside, not pass its own cache beside it ("Passing both cache_implementation and cache")."""
    model = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8"}, "kv_cache": {"num_blocks": 16}})
    ids = sample_ids(batch=1, length=5)
    pooled = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.generation_config.cache_implementation = "static"
    static = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(static, pooled)
    model.generation_config.compile_config = compiled_generate_kwargs()["compile_config"]
    compiled = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled, pooled)
