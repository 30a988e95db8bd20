"""The int4/int2 page rows (``kivi.row_layout``, ``WindowedKVCodec``): int4 value rows keep one symmetric scale, and a
key group's meta fills its key rows' meta bytes, then the rest of its value rows'."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kvcache.codec import unpack_to
from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec, row_layout


def test_rows_are_the_least_that_hold_keys_and_values():
    # SmolLM2's K/V shape: 3 heads of 64. int4: 96 code bytes, 12 bytes of key meta a token, 2 of value scale
    assert row_layout(4, 3, 64, row_scale=True) == (96, 7, 2)
    assert row_layout(4, 3, 64) == (96, 12, 12)  # a (scale, low) per head: the value rows' own meta sets the size
    assert row_layout(2, 3, 64) == (48, 12, 12)
    assert (WindowedKVCodec(4, 3, 64).row_bytes, WindowedKVCodec(2, 3, 64).row_bytes) == (103, 60)
    # head_dim 80 (value groups of 16): key meta 10 bytes a token, the value scale 2
    code, meta, value_meta = row_layout(4, 2, 80, row_scale=True)
    assert (code, meta, value_meta) == (80, 6, 2)
    assert GROUP * (meta + meta - value_meta) >= 2 * 2 * 80 * 2  # the group's key meta fits its K and V rows


def _group(heads: int = 3, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, GROUP, heads, dim, generator=g) * (1 + 5 * (torch.rand(dim, generator=g) > 0.9))
    return keys, torch.randn(2 * GROUP, heads, dim, generator=g)


@pytest.mark.parametrize(("heads", "dim"), [(3, 64), (2, 80)])
def test_key_groups_read_their_meta_from_their_value_rows_too(heads, dim):
    codec = WindowedKVCodec(4, heads, dim)
    keys, values = _group(heads, dim)
    key_rows, value_rows = codec.encode(keys, values)
    want = codec.decode_keys(key_rows, value_rows, torch.float32)
    step = (keys.amax(1, keepdim=True) - keys.amin(1, keepdim=True)) / 15  # per channel over each group
    assert ((want.reshape(keys.shape) - keys).abs() <= step / 2 * 1.01 + 1e-3).all()  # within half a step
    own = codec.code_bytes + codec.value_meta_bytes
    spoiled = value_rows.clone()
    spoiled[: GROUP // 2, own:] ^= 0x55  # the first group's key meta in its value rows
    got = codec.decode_keys(key_rows, spoiled, torch.float32)
    assert not torch.equal(got[:GROUP], want[:GROUP]) and torch.equal(got[GROUP:], want[GROUP:])
    assert torch.equal(codec.decode_values(spoiled, torch.float32), codec.decode_values(value_rows, torch.float32))


def test_int4_values_round_to_half_steps_about_zero_with_one_scale_a_row():
    codec = WindowedKVCodec(4, 3, 64)
    _, values = _group()
    values[5] = 0.0  # a zero row (trash rows are zero bytes too): zeros back
    rows = codec.encode_values(values)
    got = codec.decode_values(rows, torch.float32)
    scale = values.reshape(len(values), -1).abs().amax(1) / 7.5
    assert ((got - values).abs().reshape(len(values), -1).amax(1) <= scale / 2 * 1.01 + 1e-6).all()
    assert torch.equal(got[5], torch.zeros_like(got[5]))
    codes = unpack_to(rows[:, : codec.code_bytes], 4, torch.float32)
    assert codes.min() == 0 and codes.max() == 15  # each row's extreme takes an end level: no level left unused
    assert torch.equal(codec.decode_values(torch.zeros_like(rows), torch.float32), torch.zeros_like(values))


def test_a_scale_and_low_per_head_keeps_the_value_rows_to_themselves():
    codec = WindowedKVCodec(4, 3, 64, row_scale=False)
    keys, values = _group()
    key_rows, value_rows = codec.encode(keys, values)
    assert codec.value_group == 64 and codec.meta_bytes == codec.value_meta_bytes == 12
    assert torch.equal(value_rows, codec.encode_values(values))  # no key meta there
    assert torch.equal(
        codec.decode_keys(key_rows, torch.zeros_like(value_rows), torch.float32),
        codec.decode_keys(key_rows, value_rows, torch.float32),
    )
