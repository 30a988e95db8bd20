"""Attention over packed sequences (continuous batching's layout): each sequence alone equals SDPA over that sequence
with a bottom-right causal mask, for every kind of sequence a step holds, on every torch CPU path this machine can
take."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kernels.varlen_attention import decode_buckets, varlen_attention
from tests.kernels.cpu_paths import assert_passes_on_path

# (new tokens, keys) per sequence: decodes after short and long pasts, a whole prompt, a chunk after its past, a
# padding sequence with nothing, a single-token prompt
SEQUENCES = ((1, 40), (5, 5), (0, 0), (7, 30), (1, 1), (1, 97), (12, 12), (3, 64))
HEADS, KV_HEADS, DIM, SCALE = 6, 2, 16, 0.3


def _case(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q_total, k_total = sum(t for t, _ in SEQUENCES), sum(n for _, n in SEQUENCES)
    query = torch.randn(1, HEADS, q_total, DIM, generator=g).to(dtype)
    key, value = (torch.randn(1, KV_HEADS, k_total, DIM, generator=g).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + [t for t, _ in SEQUENCES], dtype=torch.int32).cumsum(0).int()
    cu_k = torch.tensor([0] + [n for _, n in SEQUENCES], dtype=torch.int32).cumsum(0).int()
    return query, key, value, cu_q, cu_k


def _reference(query, key, value, cu_q, cu_k, window: int | None) -> torch.Tensor:
    """Per sequence, float32 SDPA with K/V repeated per query head and an explicit bottom-right mask."""
    out = torch.zeros(query.shape, dtype=torch.float32)
    for s in range(len(SEQUENCES)):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if q1 == q0:
            continue
        t, n = q1 - q0, k1 - k0
        position = torch.arange(n - t, n)[:, None] - torch.arange(n)[None, :]
        mask = (position >= 0) & (position < (window or n + 1))
        k, v = (x[:, :, k0:k1].float().repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (key, value))
        out[:, :, q0:q1] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, q0:q1].float(), k, v, attn_mask=mask, scale=SCALE
        )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6], ids=["full", "sliding window 6"])
def test_each_sequence_sees_only_its_own_past_and_itself(dtype, window):
    query, key, value, cu_q, cu_k = _case(dtype)
    out = varlen_attention(query, key, value, cu_q, cu_k, SCALE, sliding_window=window)
    assert out.dtype == dtype and out.shape == query.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out.float() - _reference(query, key, value, cu_q, cu_k, window)).abs().max() < tol


def test_another_sequence_in_the_batch_changes_nothing():
    """The batch-composition independence continuous batching needs: a prompt chunk's rows are the same alone and
    packed beside others (bitwise: the same calls on the same slices). Decodes sharing a padded call: see
    ``test_decodes_share_calls_padded_to_at_most_twice_their_keys``."""
    query, key, value, cu_q, cu_k = _case(torch.bfloat16)
    packed = varlen_attention(query, key, value, cu_q, cu_k, SCALE)
    s = 3  # the chunk after its past
    q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
    alone = varlen_attention(
        query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
        torch.tensor([0, q1 - q0]), torch.tensor([0, k1 - k0]), SCALE,
    )  # fmt: skip
    assert torch.equal(alone, packed[:, :, q0:q1])


def test_decodes_share_calls_padded_to_at_most_twice_their_keys():
    """The one-token sequences of a step attend in shared padded calls, grouped so that no group pads a short
    request to a long context's length; each still sees exactly its own keys, and equals its own call but for
    rounding."""
    keys = (50, 200, 60, 30, 64, 7, 8)
    decodes = []
    k0 = 0
    for q0, n in enumerate(keys):
        decodes.append((q0, k0, k0 + n))
        k0 += n
    groups = decode_buckets(decodes)
    assert [[k1 - k0 for _, k0, k1 in g] for g in groups] == [[200], [64, 60, 50], [30], [8, 7]]
    for g in groups:
        longest = max(k1 - k0 for _, k0, k1 in g)
        assert len(g) * longest <= 2 * sum(k1 - k0 for _, k0, k1 in g)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, HEADS, len(keys), DIM, generator=g)
    key, value = (torch.randn(1, KV_HEADS, sum(keys), DIM, generator=g) for _ in range(2))
    cu_q = torch.arange(len(keys) + 1)
    cu_k = torch.tensor((0,) + keys).cumsum(0)
    out = varlen_attention(query, key, value, cu_q, cu_k, SCALE)
    for q0, k0, k1 in decodes:
        k, v = (x[:, :, k0:k1].repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (key, value))
        ref = torch.nn.functional.scaled_dot_product_attention(query[:, :, q0 : q0 + 1], k, v, scale=SCALE)
        assert (out[:, :, q0 : q0 + 1] - ref).abs().max() < 1e-5
        alone = varlen_attention(
            query[:, :, q0 : q0 + 1], key[:, :, k0:k1], value[:, :, k0:k1],
            torch.tensor([0, 1]), torch.tensor([0, k1 - k0]), SCALE,
        )  # fmt: skip
        assert (alone - out[:, :, q0 : q0 + 1]).abs().max() < 1e-6


def test_padding_rows_are_zero_and_bad_packing_is_refused():
    query, key, value, cu_q, cu_k = _case(torch.float32)
    padded = torch.cat([query, torch.ones(1, HEADS, 3, DIM)], dim=2)  # 3 query rows of no sequence
    out = varlen_attention(padded, key, value, cu_q, cu_k, SCALE)
    assert torch.equal(out[:, :, -3:], torch.zeros(1, HEADS, 3, DIM))
    with pytest.raises(ValueError, match="keys of a sequence must end with its own new tokens"):
        varlen_attention(query, key, value, cu_q, torch.zeros_like(cu_k), SCALE)
    with pytest.raises(ValueError, match="cannot share"):
        varlen_attention(query[:, :5], key, value, cu_q, cu_k, SCALE)


@pytest.mark.parametrize("capability", reachable_capabilities())
def test_every_cpu_path_agrees(capability):
    """torch's CPU flash kernel is compiled per CPU capability: each one this machine can run, in a fresh process."""
    code = (
        "import torch, tests.kernels.test_varlen_attention as t\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for window in (None, 6):\n"
        "        t.test_each_sequence_sees_only_its_own_past_and_itself(dtype, window)\n"
        "t.test_decodes_share_calls_padded_to_at_most_twice_their_keys()\n"
    )
    assert_passes_on_path(capability, code)


def test_rows_the_caller_answers_are_left_to_it():
    """``answered_rows``: those decodes are neither computed nor read (their K/V may be unfilled), every other row is
    what it is without them."""
    query, key, value, cu_q, cu_k = _case(torch.float32)
    full = varlen_attention(query, key, value, cu_q, cu_k, SCALE)
    answered = {int(cu_q[0]), int(cu_q[5])}  # two decodes, after 39 and 96 keys of their own
    key, value = key.clone(), value.clone()
    for s in (0, 5):
        key[:, :, int(cu_k[s]) : int(cu_k[s + 1])] = float("nan")
    out = varlen_attention(query, key, value, cu_q, cu_k, SCALE, answered_rows=answered)
    rows = torch.tensor(sorted(answered))
    assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
    others = torch.tensor([r for r in range(query.shape[2]) if r not in answered])
    assert (out[:, :, others] - full[:, :, others]).abs().max() < 1e-6
