"""Segmented attention (a chunk over its history, a segment at a time): the CPU flash path, the plain-ops path and
SDPA over everything at once agree, on every torch CPU path this machine can take."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kernels.segmented_attention import CAUSAL, segmented_attention
from tests.kernels.cpu_paths import assert_passes_on_path


def _case(dtype: torch.dtype, seed: int = 0):
    """GQA (8 query heads on 2 KV heads), 7 chunk rows after 19 history tokens, causal over the chunk; the mask hides
    the first 5 history tokens of batch row 1 and the whole history from query row 3 of batch row 0."""
    g = torch.Generator().manual_seed(seed)
    b, h, kv, q, past, d = 2, 8, 2, 7, 19, 16
    query = torch.randn(b, h, q, d, generator=g).to(dtype)
    keys, values = (torch.randn(b, kv, past + q, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(b, 1, q, past + q, dtype=torch.bool)
    mask[..., past:] = torch.ones(q, q, dtype=torch.bool).tril()
    mask[1, :, :, :5] = False
    mask[0, :, 3, :past] = False
    return query, keys, values, mask, past


def _segments(keys, values, mask, past: int, size: int, causal_own: bool):
    for s in range(0, past, size):
        e = min(s + size, past)
        part = mask[..., s:e]
        yield keys[:, :, s:e], values[:, :, s:e], None if bool(part.all()) else part
    own = mask[..., past:]
    yield keys[:, :, past:], values[:, :, past:], CAUSAL if causal_own else own


def _reference(query, keys, values, mask):
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    return torch.where(mask.any(-1, keepdim=True), out, 0.0)  # rows that see nothing: zeros (SDPA: NaN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flash", [True, False], ids=["cpu flash", "plain ops"])
@pytest.mark.parametrize("size", [4, 19])
def test_segments_merge_to_one_attention(flash, size, dtype):
    """History segments of ``size`` (whole ones unmasked, some rows seeing none of a segment), then the chunk
    against itself as ``CAUSAL`` or as its mask: one attention over all of it."""
    query, keys, values, mask, past = _case(dtype)
    expected = _reference(query, keys, values, mask)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for causal_own in (True, False):
        out = segmented_attention(query, _segments(keys, values, mask, past, size, causal_own), 0.25, flash=flash)
        assert (out - expected).abs().max() < tol, (causal_own, (out - expected).abs().max())


@pytest.mark.parametrize("flash", [True, False], ids=["cpu flash", "plain ops"])
def test_a_row_that_sees_nothing_comes_out_zero(flash):
    query, keys, values, mask, past = _case(torch.float32)
    mask[0, :, 3] = False
    out = segmented_attention(query, _segments(keys, values, mask, past, 4, False), 0.25, flash=flash)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert (out - _reference(query, keys, values, mask)).abs().max() < 1e-5


def test_no_segment_is_an_error():
    with pytest.raises(ValueError, match="no segment"):
        segmented_attention(torch.zeros(1, 2, 3, 4), [], 1.0)


@pytest.mark.parametrize("capability", reachable_capabilities())
def test_every_cpu_path_agrees(capability):
    """torch's CPU flash kernel is compiled per CPU capability: each one this machine can run, in a fresh process."""
    code = (
        "import torch, tests.kernels.test_segmented_attention as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for size in (4, 19):\n"
        "        t.test_segments_merge_to_one_attention(True, size, dtype)\n"
    )
    assert_passes_on_path(capability, code)
