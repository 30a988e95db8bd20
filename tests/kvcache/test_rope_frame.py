"""Keys quantized in the rotary frame: the turn is the model's own RoPE, it comes back exactly, and it is what
makes per-channel key groups tight."""

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_vram.kvcache.kivi import WindowedKVCodec
from hf_vram.kvcache.rope_frame import RopeFrame, rope_frequencies
from tests.tiny_models import build_tiny


def test_the_frame_turns_keys_as_the_models_rope_does():
    """Turning pre-RoPE keys forward by their positions gives what Llama's attention hands the cache."""
    model = build_tiny("llama")
    config = model.config
    frame = RopeFrame.for_config(config, config.head_dim)
    keys = torch.randn(1, config.num_key_value_heads, 40, config.head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 140)[None]
    cos, sin = model.model.rotary_emb(keys, positions)
    expected, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    turned = frame.turn(keys.transpose(1, 2), *frame.angles(positions, torch.float32))
    torch.testing.assert_close(turned.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    back = frame.turn(turned, *frame.angles(positions, torch.float32, back=True))
    torch.testing.assert_close(back.transpose(1, 2), keys, rtol=1e-5, atol=1e-5)


def test_models_without_rope_keep_their_keys_and_partial_rotary_turns_only_its_channels():
    assert RopeFrame.for_config(AutoConfig.for_model("gpt2"), 64) is None
    assert RopeFrame.for_config(AutoConfig.for_model("opt"), 64) is None
    config = AutoConfig.for_model("llama", head_dim=64, hidden_size=256, num_attention_heads=4)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert rope_frequencies(config).numel() == 16
    frame = RopeFrame.for_config(config, 64)
    x = torch.randn(5, 2, 64)
    turned = frame.turn(x, *frame.angles(torch.arange(5) + 7, torch.float32))
    assert torch.equal(turned[..., 32:], x[..., 32:]) and not torch.allclose(turned[..., :32], x[..., :32])


@pytest.mark.parametrize("bits", [4, 2])
def test_key_groups_quantized_in_the_frame_lose_less(bits):
    """Keys whose channels are steady before RoPE (a few large, as real keys have) swing after it; quantized per
    channel over a group in the frame they come back closer than in the turned one, at the group's positions."""
    config = build_tiny("llama").config
    h, d = config.num_key_value_heads, config.head_dim
    g = torch.Generator().manual_seed(1)
    steady = torch.randn(1, 1, h, d, generator=g) * torch.linspace(0.2, 4.0, d)  # per channel, any token
    starts = torch.tensor([192])
    frame = RopeFrame.for_config(config, d)
    pre = steady + 0.05 * torch.randn(1, 64, h, d, generator=g)
    keys = frame.turn(pre, *frame.angles(starts[:, None] + torch.arange(64), torch.float32))
    framed = WindowedKVCodec(bits, h, d, frame=frame)
    plain = WindowedKVCodec(bits, h, d)
    values = torch.zeros(64, h, d)
    err_framed = (framed.decode_keys(*framed.encode(keys, values, starts), torch.float32, starts) - keys[0]).norm()
    err_plain = (plain.decode_keys(*plain.encode(keys, values), torch.float32) - keys[0]).norm()
    assert err_framed < 0.5 * err_plain, (err_framed, err_plain)


def test_keys_in_the_frame_need_their_positions():
    config = build_tiny("llama").config
    codec = WindowedKVCodec(4, 2, config.head_dim, frame=RopeFrame.for_config(config, config.head_dim))
    with pytest.raises(ValueError, match="start positions"):
        codec.encode(torch.zeros(1, 64, 2, config.head_dim), torch.zeros(64, 2, config.head_dim))


@pytest.mark.parametrize("bits", [4, 2])
def test_bfloat16_reads_are_the_float32_decode_rounded_once(bits):
    """A bfloat16 model's reads get each key and value decoded and turned forward in float32 and rounded once at the
    end: turning in bfloat16 (angles rounded to 8 bits) added its own error to every key."""
    config = build_tiny("llama").config
    h, d = config.num_key_value_heads, config.head_dim
    frame = RopeFrame.for_config(config, d)
    codec = WindowedKVCodec(bits, h, d, frame=frame)
    g = torch.Generator().manual_seed(2)
    keys, starts = torch.randn(3, 64, h, d, generator=g) * 4, torch.tensor([0, 640, 4096])
    rows, value_rows = codec.encode(keys, keys.reshape(-1, h, d), starts)
    exact = codec.decode_keys(rows, value_rows, torch.float32, starts)
    assert torch.equal(codec.decode_keys(rows, value_rows, torch.bfloat16, starts), exact.to(torch.bfloat16))
    angles = codec.key_angles(starts, torch.float32)
    assert torch.equal(codec.decode_keys(rows, value_rows, torch.bfloat16, angles=angles), exact.to(torch.bfloat16))
    values = codec.decode_values(value_rows, torch.float32)
    assert torch.equal(codec.decode_values(value_rows, torch.bfloat16), values.to(torch.bfloat16))
