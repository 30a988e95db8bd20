"""Values of int4/int2 pages stored turned by a Hadamard matrix (``hf_vram.kvcache.value_rotation``)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kvcache import value_rotation as value_rotation_module
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("head_dim", [64, 128, 80], ids=["exact entries", "entries not exact", "blocks of 16"])
@pytest.mark.parametrize("native", [True, False], ids=["native half matmul", "no native half matmul"])
def test_rotate_is_the_float32_product_rounded_once_in_the_states_dtype(dtype, head_dim, native, monkeypatch):
    """Half-precision states take one product in their dtype where the matrix's entries are exact there (+-1/8 for
    64, +-1/4 for blocks of 16: its float32 sums rounded once) and the CPU multiplies it natively, a float32 product
    otherwise (1/sqrt(128), or an AVX2 CPU); either way the float32 product rounded once, up to the order of the
    float32 sums (a last-place tie)."""
    monkeypatch.setattr(value_rotation_module, "native_half_matmul", lambda _: native)  # an AVX2 EPYC: float32
    x = (torch.randn(2, 37, 3, head_dim, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    matrix = value_rotation(head_dim)
    y = rotate(x, matrix)
    assert y.dtype == dtype and y.shape == x.shape
    want = (x.float() @ matrix).to(dtype)
    ulp = torch.finfo(dtype).eps * want.float().abs()
    assert ((y.float() - want.float()).abs() <= ulp).all()
    assert (y != want).float().mean() < 0.01
    torch.testing.assert_close(rotate(y, matrix).float(), x.float(), rtol=0.02, atol=0.05)  # rounded twice: back
