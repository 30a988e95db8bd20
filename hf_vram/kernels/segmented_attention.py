"""Attention over K/V that arrive in segments: each segment's attention with its log-sum-exp, merged as they come.

What a prefill chunk after a long history needs: the history is read a segment at a time (from the pool, dequantized
segment by segment), so the transient is one segment's K/V, never the whole history in full precision. K/V keep
their own head count: grouped-query attention is a reshape of the queries (a KV head's query heads become rows),
never a copy of K/V. On the CPU each segment runs torch's flash-attention kernel, which returns the log-sum-exp the
merge needs (``_scaled_dot_product_flash_attention_for_cpu``: no score matrix; the mask, when a segment needs one,
as an additive float bias); elsewhere the same math in plain torch ops (``segment_reference``, also the tests'
reference). A query row that no key of a segment may see contributes nothing for that segment; a row that sees no
key at all comes out as zeros (such rows are padding, which nothing reads).

A segment's mask: None (every key visible), ``CAUSAL`` (a square segment, row i sees keys 0..i), or a boolean
``[batch or 1, 1, q, n]`` tensor (True: attend).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

CAUSAL = "causal"
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _grouped_mask(mask: torch.Tensor, batch: int, group: int) -> torch.Tensor:
    """``[B, 1, q, n]`` -> ``[batch, 1, group * q, n]``: the rows of a KV head's ``group`` query heads."""
    q, n = mask.shape[-2:]
    return mask.expand(batch, 1, q, n)[:, :, None].expand(batch, 1, group, q, n).reshape(batch, 1, group * q, n)


def segment_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float, group: int):
    """One segment in plain torch ops: ``(out [b, kv_heads, group * q, d], lse [b, kv_heads, group * q])``, both
    float32, out zero and lse -inf on rows that see nothing."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)).mul_(scale)
    if mask is CAUSAL:
        mask = torch.ones(scores.shape[-2] // group, scores.shape[-1], dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        scores.masked_fill_(~_grouped_mask(mask, q.shape[0], group), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(weights, values.float()), lse


def _segment_flash(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float, group: int):
    """One segment through the CPU flash kernel, same contract as ``segment_reference``. A causal segment runs on
    ungrouped heads (its K/V, the chunk's own, repeated per query head: the kernel's causal mask counts rows)."""
    batch, kv_heads, rows, dim = q.shape
    keys, values, bias = keys.to(q.dtype), values.to(q.dtype), None
    if mask is CAUSAL:
        q = q.reshape(batch, kv_heads * group, rows // group, dim)
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    elif mask is not None:
        visible = _grouped_mask(mask, batch, group)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out, lse = _FLASH_CPU(q, keys, values, is_causal=mask is CAUSAL, attn_mask=bias, scale=scale)
    out, lse = out.float().reshape(batch, kv_heads, rows, dim), lse.float().reshape(batch, kv_heads, rows)
    if bias is not None:  # a row that sees no key of this segment: the kernel says lse 0, out 0; it is -inf
        lse = lse.masked_fill(~visible.any(-1), float("-inf"))
    return out, lse


def segmented_attention(
    query: torch.Tensor,
    segments: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | str | None]],
    scale: float,
    flash: bool = True,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over the concatenation of ``segments``.

    ``query``: ``[batch, heads, q, dim]``; each segment ``(keys, values, mask)``: keys/values ``[batch, kv_heads, n,
    dim]`` (``heads`` a multiple of ``kv_heads``), mask as the module docstring says. ``flash=False`` takes the
    plain-ops path on the CPU too. Returns ``[batch, heads, q, dim]`` in float32.
    """
    batch, heads, q_len, dim = query.shape
    out = lse = q = None
    for keys, values, mask in segments:
        group = heads // keys.shape[1]
        if q is None:
            q = query.reshape(batch, keys.shape[1], group * q_len, dim)
        run = _segment_flash if flash and _FLASH_CPU is not None and q.device.type == "cpu" else segment_reference
        seg_out, seg_lse = run(q, keys, values, mask, scale, group)
        if out is None:
            out, lse = seg_out, seg_lse
            continue
        new_lse = torch.logaddexp(lse, seg_lse)
        safe = torch.where(torch.isinf(new_lse), 0.0, new_lse)
        out = out * torch.exp(lse - safe)[..., None] + seg_out * torch.exp(seg_lse - safe)[..., None]
        lse = new_lse
    if out is None:
        raise ValueError("hf_vram segmented attention: no segment of keys and values was given.")
    return out.reshape(batch, heads, q_len, dim)
