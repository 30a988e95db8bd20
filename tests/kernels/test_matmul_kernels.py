"""Every fast path equals the torch reference: Triton under TRITON_INTERPRET=1, torch's packed CPU kernels."""

from __future__ import annotations

import os

import pytest
import torch

from hf_vram.kernels import dispatch
from hf_vram.kernels.reference import int4_matmul_reference, int8_matmul_reference
from hf_vram.kernels.triton_matmul import HAVE_TRITON, int4_matmul_triton, int8_matmul_triton
from hf_vram.quant import schemes

SHAPES = [(1, 64, 32), (3, 100, 70), (17, 130, 256), (40, 33, 200)]  # ragged on purpose


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1" and HAVE_TRITON


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int8_matches_reference(m, n, k, dtype):
    x, w, b = _case(m, n, k)
    q, s = schemes.quantize_int8(w)
    x = x.to(dtype)
    y = int8_matmul_triton(x, q, s, b.to(dtype))
    ref = int8_matmul_reference(x.float(), q, s) + b
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64])
def test_triton_int4_matches_reference(m, n, k, group):
    x, w, _ = _case(m, n, k, seed=1)
    packed, sz = schemes.quantize_int4(w, group)
    kp = schemes.padded_in_features(k, group)
    xp = torch.nn.functional.pad(x, (0, kp - k))
    y = int4_matmul_triton(xp, packed, sz, group)
    ref = int4_matmul_reference(xp, schemes.unpack_int4(packed), sz, group)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(y, x @ schemes.dequantize_int4(packed, sz, k).t(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", [1, 4, 16, 17, 64])
def test_cpu_int8_dispatch_matches_reference(m):
    x, w, b = _case(m, 96, 160, seed=2)
    q, s = schemes.quantize_int8(w)
    y = dispatch.int8_linear(x, q, s, b)
    ref = int8_matmul_reference(x, q, s) + b
    # Packed decode path computes in bfloat16: relative tolerance of bf16 rounding of the activations.
    tol = 1e-2 if m <= dispatch.cpu_thresholds().packed_max_rows else 1e-4
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 5, 33])
def test_cpu_int4_dispatch_matches_reference(m):
    from hf_vram.kernels.cpu import CPU_INT4_LAYOUT, int4_to_cpu_layout

    x, w, b = _case(m, 96, 256, seed=3)
    packed, sz = schemes.quantize_int4(w, 64)
    codes = schemes.unpack_int4(packed)
    y = dispatch.int4_linear(x, int4_to_cpu_layout(codes), CPU_INT4_LAYOUT, sz, 64, b)
    ref = int4_matmul_reference(x, codes, sz, 64) + b
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_w8a8_matches_reference_exactly(m, n, k):
    from hf_vram.kernels.reference import w8a8_matmul_reference
    from hf_vram.kernels.triton_matmul import w8a8_matmul_triton

    x, w, b = _case(m, n, k, seed=4)
    q, s = schemes.quantize_int8(w)
    y = w8a8_matmul_triton(x, q, s, b)
    ref = w8a8_matmul_reference(x, q, s) + b
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 7, 64])
def test_cpu_w8a8_fbgemm_close_to_exact_w8a8(m):
    from hf_vram.kernels import cpu
    from hf_vram.kernels.reference import w8a8_matmul_reference

    x, w, b = _case(m, 128, 192, seed=5)
    x[:, :3] *= 20  # outlier channels: per-token scaling must keep the other tokens' precision
    q, s = schemes.quantize_int8(w)
    packed = cpu.w8a8_pack(q, s)
    assert torch.equal(cpu.w8a8_unpack(packed), q)
    y = dispatch.w8a8_linear(x, None, packed, s, b)
    ref = w8a8_matmul_reference(x, q, s) + b
    exact = x @ w.t() + b
    # FBGEMM on AVX2 uses 7-bit activation codes (see kernels/cpu.py): within 3x the exact W8A8 error.
    assert (y - exact).norm() <= 3 * (ref - exact).norm() + 1e-6
    assert ((y - exact).norm() / exact.norm()) < 0.1
