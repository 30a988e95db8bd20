"""2-bit keys give each channel of a (group, head) 0, 2 or 4 bits (``kivi.key_widths``), 2 on average: the rows keep
their size, the widths ride in the signs of the scales, and the rounding error falls where channels differ in range."""

from __future__ import annotations

import torch

from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec, _quantize_clipped, key_widths, slot_map


def _keys(seed: int, heads: int = 3, dim: int = 64, groups: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 1, dim)[torch.randperm(dim, generator=g)]  # channel ranges over three decades
    return torch.randn(groups, GROUP, heads, dim, generator=g) * spread


def test_widths_spend_two_bits_a_channel_and_ride_in_the_scales():
    codes, scale, low = key_widths(_keys(0))
    slots = torch.where(scale == 0, 0, torch.where(scale < 0, 2, 1))
    assert (slots.sum(-1) == 64).all()  # D slots of 2 bits per (group, head): the bytes of uniform 2-bit codes
    assert {0, 1, 2} <= set(slots.unique().tolist())  # flat channels give their bits to wide ones
    assert codes.min() >= 0 and codes.max() <= 3
    assert scale.dtype == low.dtype == torch.float16


def test_the_codec_round_trip_has_less_error_than_one_width_for_all():
    keys = _keys(1)
    codec = WindowedKVCodec(2, 3, 64)
    rows, value_rows = codec.encode(keys, torch.zeros(2 * GROUP, 3, 64))
    assert rows.shape == value_rows.shape == (2 * GROUP, codec.row_bytes)
    got = codec.decode_keys(rows, value_rows, torch.float32).reshape(keys.shape)
    codes, scale, low = _quantize_clipped(keys, 2, 1)
    uniform = codes * scale.float() + low.float()
    assert (got - keys).square().mean() < 0.5 * (uniform - keys).square().mean()


def test_a_flat_channel_comes_back_as_its_mean_and_a_zero_group_as_zeros():
    keys = _keys(2, groups=1)
    keys[:, :, 0, 5] = 0.25
    keys[:, :, 1] = 0.0
    codec = WindowedKVCodec(2, 3, 64)
    got = codec.decode_keys(*codec.encode(keys, torch.zeros(GROUP, 3, 64)), torch.float32).reshape(keys.shape)
    assert torch.equal(got[:, :, 0, 5], keys[:, :, 0, 5])
    assert torch.equal(got[:, :, 1], keys[:, :, 1])


def test_the_slot_map_stays_inside_the_head_whatever_the_scales_say():
    scale = -torch.ones(64)  # every channel asking for 4 bits: twice the slots there are
    lo, hi, a, b = slot_map(scale)
    assert lo.max() <= 63 and hi.max() <= 63
    assert torch.equal(a, torch.ones(64)) and torch.equal(b, torch.full((64,), 4.0))
