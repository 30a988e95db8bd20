"""Keys turned back to before their rotary embedding: the frame 4- and 2-bit key groups are quantized in.

RoPE turns each pair of key channels by an angle that grows with the token's position, so over a 64-token group a
channel that is steady before the turn swings between +m and -m after it, and a per-channel range spends its levels
on that swing. KVQuant (arXiv 2401.18079) quantizes keys before RoPE for this reason. Transformers' attention hands
the cache keys already turned, so hf_vram turns each key back by its position before quantizing and forward again
after dequantizing. Measured first with a prototype on SmolLM2 (int4, groups of 64, two 8192-token pydoc windows
read as decode steps would): +1.08% perplexity in the turned frame, +0.82% turned back; turning each group back to
its own first token only (no positions needed) was +0.95%.

The turn is a change of frame, exact up to rounding: a model whose rotary convention differs from the
``rotate_half`` one assumed here, or whose frequencies change with the sequence (dynamic NTK), still gets its keys
back, only without the gain. Models without RoPE (GPT-2, OPT) keep their keys as they are.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_frequencies(config) -> torch.Tensor | None:
    """The inverse frequencies (float32, one per channel pair) of ``config``'s full-attention layers, or None for a
    model without rotary embeddings."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    if not isinstance(params, dict) or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type in ROPE_INIT_FUNCTIONS:
        layer_type = "full_attention" if "full_attention" in (config.rope_parameters or {}) else None
        return ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)[0].float()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RopeFrame:
    """Turns ``[..., heads, head_dim]`` keys by their positions' rotary angles: channels ``i`` and ``i + n`` as a
    pair, for ``i < n`` = the number of frequencies (the ``rotate_half`` layout; later channels untouched)."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int) -> None:
        self.inv_freq = inv_freq.float()
        self.pairs, self.head_dim = inv_freq.numel(), head_dim

    @classmethod
    def for_config(cls, config, head_dim: int) -> RopeFrame | None:
        """The frame of ``config``'s keys, or None where there is nothing to turn."""
        inv_freq = rope_frequencies(config)
        return cls(inv_freq, head_dim) if inv_freq is not None and 0 < 2 * inv_freq.numel() <= head_dim else None

    def angles(self, positions: torch.Tensor, dtype: torch.dtype, back: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``' angles as ``turn`` takes them: ``(cos, signed sin)`` over every channel (1 and 0 past the
        rotary ones), shaped ``[*positions.shape, 1, head_dim]`` (broadcast over heads); ``back`` turns the other
        way."""
        angle = positions[..., None, None].float() * self.inv_freq.to(positions.device)
        cos, sin = angle.cos(), angle.sin()
        if back:
            sin = -sin
        rest = self.head_dim - 2 * self.pairs
        ones, zeros = (torch.full((*angle.shape[:-1], rest), v, device=angle.device) for v in (1.0, 0.0))
        return torch.cat([cos, cos, ones], -1).to(dtype), torch.cat([-sin, sin, zeros], -1).to(dtype)

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` turned by ``angles`` (RoPE's ``x * cos + rotate_half(x) * sin``) into a new tensor: one product
        and a fused multiply-add per half (``addcmul_``), no ``rotate_half`` copy: reads dequantize every cached
        key each step, and this is most of their cost."""
        n = self.pairs
        out = torch.mul(x, cos)
        out[..., :n].addcmul_(x[..., n : 2 * n], sin[..., :n])
        out[..., n : 2 * n].addcmul_(x[..., :n], sin[..., n : 2 * n])
        return out
