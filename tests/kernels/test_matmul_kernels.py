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


@pytest.mark.parametrize("m", [1, 4, 16, 17, 64, 128])
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


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_dequantizing_paths_compute_bfloat16_in_float32_where_the_cpu_has_no_bf16_matmul(monkeypatch, native, kernel):
    """Prefill-sized bfloat16 batches on a CPU without native bf16 matmul (the AVX2 EPYC: 4.5-8x slower than float32)
    run their dequantized matmul in float32, returned in bfloat16; with native bf16 they stay in bf16. Either way
    the result is the reference's, and an explicit compute dtype is obeyed."""
    from hf_vram.kernels.cpu import CPU_INT4_LAYOUT, int4_to_cpu_layout

    monkeypatch.setattr(dispatch, "NATIVE_HALF", frozenset({torch.bfloat16}) if native else frozenset())
    rows = 2 * max(dispatch.cpu_thresholds().packed_max_rows, dispatch.cpu_thresholds().int4_dequant_min_rows)
    x, w, b = _case(rows, 96, 256, seed=6)
    xb = x.bfloat16()
    assert dispatch.dequant_dtype(xb, None) == (torch.bfloat16 if native else torch.float32)
    assert dispatch.dequant_dtype(xb, torch.bfloat16) == torch.bfloat16  # the layer's compute dtype wins
    assert dispatch.dequant_dtype(x, None) == torch.float32
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(dispatch.F, "linear", lambda a, m, *r: seen.append(a.dtype) or linear(a, m, *r))
    if kernel == "int8":
        q, s = schemes.quantize_int8(w)
        y = dispatch.int8_linear(xb, q, s, b)
        ref = int8_matmul_reference(xb.float(), q, s) + b
    else:
        packed, sz = schemes.quantize_int4(w, 64)
        codes = schemes.unpack_int4(packed)
        y = dispatch.int4_linear(xb, int4_to_cpu_layout(codes), CPU_INT4_LAYOUT, sz, 64, b)
        ref = int4_matmul_reference(xb.float(), codes, sz, 64) + b
    assert y.dtype == torch.bfloat16 and seen == [torch.bfloat16 if native else torch.float32]
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_native_half_matmul_reads_the_cpu_flags(monkeypatch):
    from hf_vram.kernels import cpu_caps

    monkeypatch.setattr(cpu_caps.platform, "machine", lambda: "x86_64")
    for flags, bf16, fp16 in [
        ({"avx2", "fma"}, False, False),  # the AMD EPYC of this project
        ({"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16"}, True, True),  # the Xeon
        ({"avx2", "avx512f", "avx512bw"}, True, False),  # AVX-512 without bf16/fp16 units: oneDNN converts
    ]:
        monkeypatch.setattr(cpu_caps, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert cpu_caps.native_half_matmul(torch.bfloat16) is bf16
        assert cpu_caps.native_half_matmul(torch.float16) is fp16
        assert cpu_caps.native_half_matmul(torch.float32) is True
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: frozenset())
    assert cpu_caps.native_half_matmul(torch.bfloat16) is True  # nothing known: unchanged behaviour
