"""A prefill chunk after a pooled history: the attention reads the history from the pool in place, a segment of
blocks at a time, instead of a gathered full-precision copy of all of it.

``PooledKVCache(history_in_place=True)`` (what hf_vram's pooled ``generate`` sets up when the model runs the
``hf_vram`` or ``hf_vram_paged`` attention) hands a chunk's attention only the chunk's own K/V and leaves a
``HistoryStep`` (the pool, each row's history slots) for that layer. The attention takes it (``take_history``) and
runs ``segmented_attention`` over the history, ``SEGMENT`` tokens at a time (gathered and, for int8 pools,
dequantized per segment), then over the chunk itself, under the model's own mask sliced to each segment (a lazily
built mask, a block of query rows at a time). The transient is one segment's K/V, not the history.

It sits with the kernels because two rooms use it: the fused attention (``fusion``) and the paged attention and the
pool (``kvcache``). Pairing is checked as for paged decode: a step that no attention took raises at the next layer,
rather than letting a model with another attention compute over the chunk alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hf_vram.kernels.segmented_attention import CAUSAL, segmented_attention

SEGMENT = 1024  # history tokens gathered (and dequantized) at a time
MASK_ELEMENTS = 1 << 22  # a lazy mask is built this many booleans at a time (as the hf_vram attention does)
ATTENTIONS = ("hf_vram", "hf_vram_paged")  # the attention functions that take a HistoryStep
_LOCAL = threading.local()


@dataclass
class HistoryStep:
    """One layer's history for a chunk: ``slots`` ``[batch, past]`` are each row's flat pool slots (pads: the null
    block, which the mask hides)."""

    layer: int
    pool: object  # KVCachePool (not imported: the pool imports nothing of attention)
    slots: torch.Tensor
    consumed: bool = False


def set_history(step: HistoryStep | None) -> None:
    """Leave ``step`` for the next attention call; raises if the previous step was never taken."""
    previous = getattr(_LOCAL, "history", None)
    _LOCAL.history = step
    if previous is not None and not previous.consumed:
        _LOCAL.history = None
        raise RuntimeError(
            f"hf_vram: PooledKVCache(history_in_place=True) left layer {previous.layer} its history in the pool, but "
            "the model's attention did not read it (it would have attended to the chunk alone); run the model with "
            f"attn_implementation in {ATTENTIONS} or create the cache with history_in_place=False."
        )


def clear_history() -> None:
    _LOCAL.history = None


def take_history(module) -> HistoryStep | None:
    """The pending step for ``module``'s layer, marked taken, or None."""
    step = getattr(_LOCAL, "history", None)
    if step is None or step.consumed or step.layer != getattr(module, "layer_idx", None):
        return None
    step.consumed = True
    return step


def _mask_rows(attention_mask, start: int, stop: int) -> torch.Tensor | None:
    """Rows ``start:stop`` of the chunk's mask over history + chunk, as booleans; None when the model gave none
    (``_segments`` then takes the history as all visible and the chunk as causal)."""
    if attention_mask is None:
        return None
    if hasattr(attention_mask, "rows"):  # fusion.attention.LazyMask
        rows = attention_mask.rows(start, stop)
    else:
        rows = attention_mask[:, :, start:stop]
    return rows if rows.dtype == torch.bool else rows == 0  # an additive float mask: 0 where a key is seen


def _segments(step: HistoryStep, key, value, mask, start: int, stop: int, dtype: torch.dtype) -> Iterator[tuple]:
    """The history from the pool, ``SEGMENT`` tokens at a time, then the chunk's own K/V, each with the mask it
    needs: none where every key is visible (no mask given, or a slice that is all True); under a causal mask the
    chunk's tokens before these rows unmasked and these rows' own square ``CAUSAL``; the slice itself otherwise."""
    past, chunk = step.slots.shape[1], key.shape[2]
    for s in range(0, past, SEGMENT):
        e = min(s + SEGMENT, past)
        k, v = step.pool.gather(step.layer, step.slots[:, s:e], dtype)
        part = None if mask is None else mask[..., s:e]
        yield k, v, None if part is None or bool(part.all()) else part
    causal = torch.ones(stop - start, chunk, dtype=torch.bool, device=key.device).tril(start)[None, None]
    if mask is None or bool((mask[..., past:] == causal).all()):  # causal rows: no mask built
        if start:
            yield key[:, :, :start], value[:, :, :start], None  # the chunk's earlier tokens: all seen
        yield key[:, :, start:stop], value[:, :, start:stop], CAUSAL  # later ones: none
    else:
        yield key, value, mask[..., past:]


def attend(step: HistoryStep, query, key, value, attention_mask, scaling: float | None) -> torch.Tensor:
    """The chunk's attention over its history (in the pool) and itself: ``[batch, q, heads, dim]`` in the query's
    dtype, the contract of Transformers' attention functions."""
    batch, _, q_len, dim = query.shape
    total = step.slots.shape[1] + key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    rows = q_len if not hasattr(attention_mask, "rows") else max(1, MASK_ELEMENTS // max(1, batch * total))
    outs = []
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        mask = _mask_rows(attention_mask, start, stop)
        segments = _segments(step, key, value, mask, start, stop, query.dtype)
        outs.append(segmented_attention(query[:, :, start:stop], segments, scale))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(query.dtype).transpose(1, 2).contiguous()
