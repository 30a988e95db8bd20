"""Every fast path equals the torch reference: Triton under TRITON_INTERPRET=1, torch's packed CPU kernels."""

from __future__ import annotations

import os

import pytest
import torch

from hf_vram.kernels import dispatch, triton_matmul
from hf_vram.kernels.reference import int4_matmul_reference, int8_matmul_reference
from hf_vram.kernels.triton_matmul import HAVE_TRITON, int4_matmul_triton, int8_matmul_triton, w8a8_matmul_triton
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_triton_int4_in_half_precision_matches_reference(dtype, group):
    """16-bit activations: the codes enter the dot in the activations' dtype, each group's scale and zero after it."""
    x, w, b = _case(5, 48, 256, seed=2)
    packed, sz = schemes.quantize_int4(w, group)
    y = int4_matmul_triton(x.to(dtype), packed, sz, group, b.to(dtype))
    ref = int4_matmul_reference(x.to(dtype).float(), schemes.unpack_int4(packed), sz, group) + b.to(dtype).float()
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", [(1, 96, 1024), (5, 40, 2000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_sizes_split_k_and_still_match_the_reference(m, n, k, dtype):
    """Decode-sized M splits the K loop across programs (float32 partials, the bias added once): int8 weight-only,
    W8A8 and int4 each equal their reference with the split on, and the split is really taken."""
    block_m, block_n, block_k = triton_matmul._blocks(m)
    splits, per_split = triton_matmul.split_k(m, n, k, block_m, block_n, block_k, torch.device("cpu"))
    assert splits > 1 and per_split % block_k == 0 and splits * per_split >= k > (splits - 1) * per_split
    x, w, b = _case(m, n, k, seed=3)
    x, b = x.to(dtype), b.to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    q, s = schemes.quantize_int8(w)
    ref = int8_matmul_reference(x.float(), q, s) + b.float()
    torch.testing.assert_close(int8_matmul_triton(x, q, s, b).float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    xs = x.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    xq = torch.round(x.float() / xs[:, None]).clamp(-127, 127)
    exact = (xq @ q.float().t()) * xs[:, None] * s[None, :] + b.float()
    torch.testing.assert_close(w8a8_matmul_triton(x, q, s, b).float(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    packed, sz = schemes.quantize_int4(w, 64)
    kp = schemes.padded_in_features(k, 64)
    xp = torch.nn.functional.pad(x, (0, kp - k))
    ref4 = int4_matmul_reference(xp.float(), schemes.unpack_int4(packed), sz, 64) + b.float()
    y4 = int4_matmul_triton(xp, packed, sz, 64, b)
    torch.testing.assert_close(y4.float(), ref4, rtol=tol, atol=tol * ref4.abs().max().item())


def test_split_k_stays_off_for_prefill_and_when_turned_off(monkeypatch):
    cpu = torch.device("cpu")
    assert triton_matmul.split_k(64, 96, 4096, 64, 64, 64, cpu) == (1, 4096)
    monkeypatch.setattr(triton_matmul, "DECODE_PROGRAMS_PER_SM", 0)
    assert triton_matmul.split_k(1, 96, 4096, 16, 64, 64, cpu) == (1, 4096)


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
