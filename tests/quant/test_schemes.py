"""Quantize/dequantize error bounds and pack/unpack round trips (property-based)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from hf_vram.kernels.cpu import cpu_int4_supported, int4_from_cpu_layout, int4_to_cpu_layout
from hf_vram.quant import schemes

shapes = st.tuples(st.integers(1, 40), st.integers(1, 300))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e3))
def test_int8_error_within_half_step(shape, seed, scale):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = schemes.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (schemes.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    group=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    search=st.sampled_from(["none", "clip"]),
)
def test_int4_error_bound_and_shapes(shape, seed, group, symmetric, search):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    packed, sz = schemes.quantize_int4(w, group, symmetric, search)
    padded = schemes.padded_in_features(shape[1], group)
    assert packed.shape == (shape[0], padded // 2) and packed.dtype == torch.uint8
    assert sz.shape == (padded // group, shape[0], 2)
    w_hat = schemes.dequantize_int4(packed, sz, shape[1])
    assert w_hat.shape == w.shape
    # Every weight is within one quantization step of its group (clipping may cost up to the clipped range).
    groups = torch.nn.functional.pad(w, (0, padded - shape[1])).view(shape[0], -1, group)
    span = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(group, dim=1)[:, : shape[1]]
    bound = span / 15 * (1.6 if search == "none" else 4.0) + 1e-3
    if symmetric:
        bound = (
            groups.abs().amax(-1).repeat_interleave(group, dim=1)[:, : shape[1]] / 7 * (0.6 if search == "none" else 4.0) + 1e-3
        )
    assert ((w_hat - w).abs() <= bound).all()


def test_clip_search_never_increases_weight_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    errs = {}
    for search in ("none", "clip"):
        p, sz = schemes.quantize_int4(w, 64, False, search)
        errs[search] = (schemes.dequantize_int4(p, sz, 256) - w).pow(2).sum().item()
    assert errs["clip"] < errs["none"]


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 20), half=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, half, seed):
    codes = torch.randint(0, 16, (rows, half * 2), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(schemes.unpack_int4(schemes.pack_int4(codes)), codes)


@pytest.mark.parametrize("n,k", [(16, 64), (192, 640), (1536, 576), (48, 128)])
def test_cpu_int4_layout_round_trip(n, k):
    assert cpu_int4_supported(n, k)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert torch.equal(int4_from_cpu_layout(int4_to_cpu_layout(codes)), codes)


def test_int4_layer_without_cpu_kernel_shape_falls_back_exactly():
    from hf_vram.quant.linear import Int4Linear

    assert not cpu_int4_supported(8, 64)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    layer = Int4Linear(64, 8, False, group_size=32)
    layer.load_quantized(layer.quantize_weight(w))
    assert layer.layout == "packed"  # torch's CPU kernel needs out_features divisible by 16
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantize_weight().t(), rtol=1e-4, atol=1e-4)


def test_nan_weight_is_refused():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        schemes.quantize_int8(w)
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        schemes.quantize_int4(w)
