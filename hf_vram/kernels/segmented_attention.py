"""Attention over K/V that arrive in segments, merged with an online softmax (the flash-attention recurrence in
torch ops, float32).

What a prefill chunk after a long history needs: the history is read a segment at a time (from the pool, dequantized
segment by segment), so the transient is one segment's K/V and scores, never the whole history in full precision.
K/V keep their own head count (grouped-query attention is a reshape of the queries, never a copy of K/V). A query
row that no key of a segment may see (its mask row all False there) contributes nothing for that segment; a row that
sees no key at all comes out as zeros (SDPA gives NaN there; such rows are padding, which nothing reads).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def segmented_attention(
    query: torch.Tensor,
    segments: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scale: float,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over the concatenation of ``segments``.

    ``query``: ``[batch, heads, q, dim]``; each segment ``(keys, values, mask)``: keys/values ``[batch, kv_heads, n,
    dim]`` (``heads`` a multiple of ``kv_heads``), mask ``[batch or 1, 1, q, n]`` boolean (True: attend) or additive
    float, or None (every key visible). Returns ``[batch, heads, q, dim]`` in float32.
    """
    batch, heads, q_len, dim = query.shape
    q = None
    out = row_max = row_sum = None
    for keys, values, mask in segments:
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        if q is None:
            q = query.float().reshape(batch, kv_heads, group * q_len, dim)
            out = torch.zeros_like(q)
            row_max = torch.full((batch, kv_heads, group * q_len, 1), float("-inf"), device=query.device)
            row_sum = torch.zeros(batch, kv_heads, group * q_len, 1, device=query.device)
        scores = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scale)  # [b, kv_heads, group * q, n]
        if mask is not None:
            view = scores.view(batch, kv_heads, group, q_len, -1)
            if mask.dtype == torch.bool:
                view.masked_fill_(~mask[:, :, None], float("-inf"))
            else:
                view.add_(mask[:, :, None].float())
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows that see nothing yet
        weights = torch.exp(scores.sub_(safe_max))
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + weights.sum(-1, keepdim=True)
        out = out.mul_(correction).add_(torch.matmul(weights, values.float()))
        row_max = new_max
    if q is None:
        raise ValueError("hf_vram segmented attention: no segment of keys and values was given.")
    out = out / row_sum.clamp_min(torch.finfo(torch.float32).tiny)
    return out.view(batch, heads, q_len, dim)
