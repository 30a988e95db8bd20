"""Fusion kernels equal their torch references under TRITON_INTERPRET=1: flash attention and add + RMSNorm."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels.triton_flash import flash_attention_triton, flash_reference
from hf_vram.kernels.triton_norm import add_rms_norm_reference, add_rms_norm_triton


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "q_len", "k_len", "dim", "causal", "padded", "dtype"),
    [
        (1, 9, 3, 70, 70, 64, True, False, torch.float32),  # SmolLM2 GQA prefill, ragged length
        (2, 4, 2, 33, 33, 16, True, True, torch.float32),  # left padding
        (2, 4, 4, 1, 40, 24, True, True, torch.float32),  # decode step against a cache, head_dim not a power of 2
        (2, 4, 2, 8, 29, 32, True, False, torch.float16),  # chunked prefill over a cache
        (2, 4, 4, 17, 17, 32, False, True, torch.bfloat16),  # bidirectional (BERT) with padding
    ],
)
def test_flash_kernel_matches_reference(batch, hq, hkv, q_len, k_len, dim, causal, padded, dtype):
    g = torch.Generator().manual_seed(q_len * 31 + dim)
    q = torch.randn(batch, hq, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, hkv, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, hkv, k_len, dim, generator=g).to(dtype)
    valid = None
    if padded:
        valid = torch.ones(batch, k_len, dtype=torch.bool)
        valid[0, :5] = False
    ref = flash_reference(q, k, v, dim**-0.5, causal, valid)
    out = flash_attention_triton(q, k, v, dim**-0.5, causal, valid)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm_kernel_matches_reference(gemma, dtype, residual):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 72, generator=g).to(dtype)
    r = torch.randn(5, 3, 72, generator=g).to(dtype) if residual else None
    w = (torch.randn(72, generator=g) * 0.1 + (0 if gemma else 1)).to(dtype)
    total_ref, out_ref = add_rms_norm_reference(x, r, w, 1e-6, gemma)
    total, out = add_rms_norm_triton(x, r, w, 1e-6, gemma)
    torch.testing.assert_close(total, total_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), out_ref.float(), atol=tol, rtol=tol)
