"""Values of int4/int2 pages stored turned by a Hadamard matrix (``hf_vram.kvcache.value_rotation``)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kvcache.kivi import WindowedKVCodec
from hf_vram.kvcache.value_rotation import rotate, value_rotation


@pytest.mark.parametrize(("head_dim", "block"), [(64, 64), (128, 128), (80, 16), (96, 32), (6, 2)])
def test_rotation_is_its_own_inverse_and_mixes_within_blocks(head_dim, block):
    matrix = value_rotation(head_dim)
    assert matrix.shape == (head_dim, head_dim) and matrix.dtype == torch.float32
    torch.testing.assert_close(matrix @ matrix, torch.eye(head_dim), rtol=0, atol=1e-6)  # orthonormal, symmetric
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=0)
    assert (matrix[:block, :block].abs() == block**-0.5).all()  # every channel of a block spread over all of it
    assert (matrix[:block, block:] == 0).all()


def test_odd_head_sizes_are_left_unturned():
    assert value_rotation(7) is None


@pytest.mark.parametrize("bits", [4, 2])
def test_turned_values_round_with_less_error_when_a_few_channels_are_large(bits):
    """What the turn is for: per-token value rows whose range a few large channels set round coarsely; turned, the
    same codes and scales return values nearer the originals (measured after turning back)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(256, 2, 64, generator=g)
    values[..., [3, 40]] *= 12  # two outlier channels, as real value states have
    codec, matrix = WindowedKVCodec(bits, 2, 64), value_rotation(64)
    plain = codec.decode_values(codec.encode_values(values), torch.float32)
    turned = rotate(codec.decode_values(codec.encode_values(rotate(values, matrix)), torch.float32), matrix)
    error = {name: ((x - values).norm() / values.norm()).item() for name, x in (("plain", plain), ("turned", turned))}
    assert error["turned"] < 0.7 * error["plain"], error


def test_rotate_computes_in_float32_and_keeps_the_dtype():
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    matrix = value_rotation(64)
    y = rotate(x, matrix)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ matrix).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(rotate(y, matrix).float(), x.float(), rtol=0.02, atol=0.02)
