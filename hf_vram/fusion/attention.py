"""The ``hf_vram`` attention: O(n) memory in sequence length, with the model's own masks, GQA never expanded.

Transformers' SDPA path materialises a ``[batch, 1, q, kv]`` boolean mask whenever there is padding or a sliding
window (O(n^2): 256 MiB at 16k tokens), and on the CPU it may repeat K/V for GQA. Here:

- The registered mask function returns the small mask itself when it is small, and otherwise a ``LazyMask`` that
  remembers the arguments; the attention then builds the mask one chunk of query rows at a time with Transformers'
  own ``sdpa_mask`` (the model's mask function: causal, sliding window, bidirectional, padding), so the math is the
  model's and memory is O(chunk x kv).
- A plain causal call with no padding (the mask that SDPA's ``is_causal`` expresses) goes to SDPA's fused kernel
  in one call, on every device: O(n) memory, and on CUDA 6.5x faster than hf_vram's Triton flash kernel at a 7B's
  2048-token prefill (0.10 against 0.66 ms on an H200, ``benchmarks/gpu_check.py``).
- On CUDA, the rest of causal or bidirectional attention (key padding) runs the Triton flash kernel
  (``hf_vram.kernels.triton_flash``), which takes the padding as a per-key vector where SDPA would need the
  materialised mask; a sliding window uses the chunked SDPA path.
- K/V keep their KV-head count: SDPA's ``enable_gqa`` (or the kernel's head mapping) reads them per group.
- A prefill chunk over hf_vram's pooled cache reads its history from the pool a segment at a time
  (``hf_vram.kernels.history_attention``), not from a gathered copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_vram.kernels.history_attention import attend, take_history
from hf_vram.kernels.triton_flash import HAVE_TRITON, flash_attention_triton

NAME = "hf_vram"
MASK_ELEMENTS = 1 << 22  # masks up to 4M booleans are built whole; larger ones lazily, chunk by chunk


@dataclass
class LazyMask:
    """The arguments of an ``sdpa_mask`` call, to build its rows on demand."""

    kwargs: dict

    # Cached: every layer of one forward receives the same LazyMask object.
    @cached_property
    def padding(self) -> torch.Tensor | None:
        mask = self.kwargs.get("attention_mask")
        return None if mask is None or bool(mask.all()) else mask

    def rows(self, start: int, stop: int) -> torch.Tensor:
        kw = dict(self.kwargs)
        kw.update(q_length=stop - start, q_offset=kw.get("q_offset", 0) + start, allow_is_causal_skip=False)
        kw.pop("allow_is_bidirectional_skip", None)
        return sdpa_mask(**kw)

    @cached_property
    def pattern(self) -> str:
        """``"causal"`` or ``"full"`` when the mask function is exactly that (checked on its first and last rows,
        padding aside), else ``"other"`` (e.g. a sliding window)."""
        kw = self.kwargs
        q_len, kv_len = kw["q_length"], kw["kv_length"]
        probe = dict(kw, attention_mask=None, allow_is_causal_skip=False, batch_size=1)
        probe.pop("allow_is_bidirectional_skip", None)
        rows = [sdpa_mask(**dict(probe, q_length=1, q_offset=kw.get("q_offset", 0) + r)) for r in (0, q_len - 1)]
        kv = torch.arange(kv_len) + kw.get("kv_offset", 0)
        ends = [kw.get("q_offset", 0) + r for r in (0, q_len - 1)]
        if all(bool(m.all()) for m in rows if m is not None):
            return "full"
        causal = all(m is not None and torch.equal(m.reshape(-1).cpu(), kv <= e) for m, e in zip(rows, ends, strict=True))
        return "causal" if causal else "other"


def lazy_sdpa_mask(batch_size: int, q_length: int, kv_length: int, **kwargs):
    if batch_size * q_length * kv_length <= MASK_ELEMENTS:
        return sdpa_mask(batch_size, q_length, kv_length, **kwargs)
    return LazyMask(dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, **kwargs))


def _sdpa(query, key, value, mask, is_causal: bool, scaling, dropout: float):
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )


def lazy_mask_path(pattern: str, padded: bool, q_len: int, kv_len: int, triton_cuda: bool, dropout: float) -> str:
    """Which kernel attends under a ``LazyMask``: ``"sdpa causal"`` (one fused call), ``"triton flash"`` (CUDA,
    padding as a per-key vector) or ``"chunked sdpa"`` (the mask built a chunk of query rows at a time)."""
    if pattern == "causal" and not padded and q_len == kv_len:
        return "sdpa causal"
    if triton_cuda and pattern in ("causal", "full") and dropout == 0.0:
        return "triton flash"
    return "chunked sdpa"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Same contract as Transformers' attention functions: returns ``([B, q, H, D], None)``."""
    history = take_history(module)  # a prefill chunk whose history stays in hf_vram's pool
    if history is not None:
        return attend(history, query, key, value, attention_mask, scaling), None
    q_len, kv_len = query.shape[2], key.shape[2]
    dropout = dropout if module.training else 0.0
    if isinstance(attention_mask, LazyMask):
        pattern = attention_mask.pattern
        padding = attention_mask.padding
        path = lazy_mask_path(pattern, padding is not None, q_len, kv_len, query.is_cuda and HAVE_TRITON, dropout)
        if path == "sdpa causal":
            out = _sdpa(query, key, value, None, True, scaling, dropout)
        elif path == "triton flash":
            valid = padding.bool() if padding is not None else None
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = flash_attention_triton(query, key, value, scale, pattern == "causal", valid)
        else:
            chunk = max(1, MASK_ELEMENTS // max(1, query.shape[0] * kv_len))
            out = torch.cat(
                [
                    _sdpa(
                        query[:, :, s : s + chunk],
                        key,
                        value,
                        attention_mask.rows(s, min(s + chunk, q_len)),
                        False,
                        scaling,
                        dropout,
                    )
                    for s in range(0, q_len, chunk)
                ],
                dim=2,
            )
    else:
        is_causal = attention_mask is None and q_len > 1 and getattr(module, "is_causal", True)
        out = _sdpa(query, key, value, attention_mask, is_causal, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, lazy_sdpa_mask)


register()  # on import: a saved model naming this attention finds it (hf_vram.hf.registration)
