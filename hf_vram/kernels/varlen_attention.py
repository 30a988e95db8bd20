"""Attention over packed sequences (continuous batching's layout): each sequence's queries see only its own keys.

Transformers' continuous batching packs every live request into one row of queries and one row of keys, and its
SDPA path then runs one attention over all of them with a ``[q, k]`` block-diagonal mask: the cost and the mask grow
with (tokens this step) x (tokens read, all requests), nearly all of it masked out, and K/V are first repeated to the
query-head count for GQA. Here each sequence attends to its own slice only, with K/V at their own head count (a KV
head's query heads become rows of one query block):

- one new token (decode): such sequences of the step share calls, their K/V gathered into a padded batch of
  sequences with at least half the keys of its longest (``decode_buckets``), the query heads of a KV head as rows;
- a prompt's first chunk (as many new tokens as keys): the causal kernel;
- a later chunk (past + new): the past unmasked and the chunk causally, merged by log-sum-exp
  (``segmented_attention``: no ``[q, k]`` mask);
- a sliding window: an explicit boolean mask, bottom-right aligned like flash-attention's varlen kernel.

On the CPU every call but the decodes' shared ones is torch's flash-attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``); those, and every call elsewhere, ``scaled_dot_product_attention``
(with the padding as its mask). ``cu_seqlens_q`` / ``cu_seqlens_k`` are the cumulative lengths Transformers passes
(``cu_seq_lens_q`` / ``cu_seq_lens_k``); a sequence with no queries (padding) is skipped; the keys of a sequence end
with its own new tokens.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F

from hf_vram.kernels.segmented_attention import _FLASH_CPU, CAUSAL, segmented_attention


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``[1, kv_heads, rows, d]`` queries (GQA rows) over ``[1, kv_heads, n, d]`` K/V, or ``[1, heads, t, d]`` with
    ``causal`` (K/V already at the query-head count)."""
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype == k.dtype:
        return _FLASH_CPU(q, k, v, is_causal=causal, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """``[q_len, k_len]``: query i (at key position k_len - q_len + i) sees keys j with 0 <= pos - j < window."""
    pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    distance = pos - torch.arange(k_len, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def _one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """One sequence: ``q`` ``[heads, t, d]``, ``k``/``v`` ``[kv_heads, n, d]`` (n >= t, the last t keys are the
    queries' own tokens). Returns ``[heads, t, d]`` in ``q``'s dtype."""
    heads, t, d = q.shape
    kv_heads, n = k.shape[0], k.shape[1]
    group = heads // kv_heads
    if window is not None and n > 1 and (n > window or t > 1):
        mask = _window_mask(t, n, window, q.device)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)
        return out[0]
    if t == 1:  # decode: a KV head's query heads are the rows of one unmasked call
        out = _attend(q.reshape(1, kv_heads, group, d), k[None], v[None], scale, causal=False)
        return out.reshape(heads, 1, d)
    if t == n:  # a prompt's first chunk
        k, v = (x.repeat_interleave(group, dim=0) for x in (k, v)) if group > 1 else (k, v)
        return _attend(q[None], k[None], v[None], scale, causal=True)[0]
    segments = [(k[None, :, : n - t], v[None, :, : n - t], None), (k[None, :, n - t :], v[None, :, n - t :], CAUSAL)]
    return segmented_attention(q[None], segments, scale)[0].to(q.dtype)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    answered_rows: Collection[int] = frozenset(),
) -> torch.Tensor:
    """``query`` ``[1, heads, Q, d]``, ``key``/``value`` ``[1, kv_heads, K, d]`` packed by ``cu_seqlens_q`` /
    ``cu_seqlens_k`` (``[S + 1]``). Returns ``[1, heads, Q, d]``; rows of no sequence (padding) are zeros, and so
    are the first query rows of the sequences in ``answered_rows``, which the caller attends by other means (their
    K/V slots are not read)."""
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(f"hf_vram varlen attention: {query.shape[1]} query heads cannot share {key.shape[1]} KV heads evenly.")
    out = torch.zeros_like(query)
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    together = set(answered_rows)  # query rows answered by the caller or by a shared decode call
    if sliding_window is None:
        decodes = [  # one new token and keys to read (a sequence without keys is refused by the loop below)
            (q_bounds[s], k_bounds[s], k_bounds[s + 1])
            for s in range(len(q_bounds) - 1)
            if q_bounds[s + 1] - q_bounds[s] == 1 and k_bounds[s + 1] > k_bounds[s] and q_bounds[s] not in together
        ]
        for bucket in decode_buckets(decodes):
            if len(bucket) > 1:
                _decode_together(query, key, value, out, bucket, scale)
                together.update(q0 for q0, _, _ in bucket)
    for s in range(len(q_bounds) - 1):
        q0, q1, k0, k1 = q_bounds[s], q_bounds[s + 1], k_bounds[s], k_bounds[s + 1]
        if q1 == q0 or q0 in together:
            continue
        if k1 - k0 < q1 - q0:
            raise ValueError(
                f"hf_vram varlen attention: sequence {s} has {q1 - q0} new tokens but only {k1 - k0} keys; the keys "
                "of a sequence must end with its own new tokens."
            )
        out[0, :, q0:q1] = _one_sequence(query[0, :, q0:q1], key[0, :, k0:k1], value[0, :, k0:k1], scale, sliding_window)
    return out


def decode_buckets(decodes: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """The one-token sequences ``(query row, first key, end of keys)`` grouped for shared calls, longest first: a
    sequence joins the current group while it has at least half the keys of the group's longest, so the padded batch
    holds at most twice the keys it attends to (one long context beside many short requests never pads them all to
    its length: that transient would be the long one's K/V times the number of requests)."""
    groups: list[list[tuple[int, int, int]]] = []
    for decode in sorted(decodes, key=lambda d: d[2] - d[1], reverse=True):
        if not groups or 2 * (decode[2] - decode[1]) < groups[-1][0][2] - groups[-1][0][1]:
            groups.append([])
        groups[-1].append(decode)
    return groups


def _decode_together(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    decodes: list[tuple[int, int, int]],
    scale: float,
) -> None:
    """One-token sequences ``(query row, first key, end of keys)`` in one attention call: their K/V gathered
    into ``[sequences, kv_heads, longest, d]`` (rows past a sequence's end masked), the query heads of a KV head as
    its rows. One call instead of one per sequence: on 2 AMD EPYC cores (AVX-512 path), 12 decodes of 128-568 keys
    in one call (bf16, 3 KV heads of 64, 9 query heads) take 0.82 ms a layer instead of 1.47, padding included."""
    kv_heads, d = key.shape[1], key.shape[-1]
    group = query.shape[1] // kv_heads
    device = query.device
    starts = torch.tensor([k0 for _, k0, _ in decodes], device=device)
    lengths = torch.tensor([k1 - k0 for _, k0, k1 in decodes], device=device)
    longest = max(k1 - k0 for _, k0, k1 in decodes)
    offsets = torch.arange(longest, device=device)
    visible = offsets[None, :] < lengths[:, None]  # [S, longest]
    rows = (starts[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)).reshape(-1)
    n = len(decodes)
    k, v = (x[0].transpose(0, 1).index_select(0, rows).view(n, longest, kv_heads, d).transpose(1, 2) for x in (key, value))
    at = torch.tensor([q0 for q0, _, _ in decodes], device=device)
    q = query[0].index_select(1, at).transpose(0, 1).reshape(n, kv_heads, group, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    out[0].index_copy_(1, at, o.reshape(n, kv_heads * group, d).transpose(0, 1).to(out.dtype))
