"""A K/V width per layer in int4/int2 pages: the few layers where 4 bits lose most kept as int8 rows
(``kv_cache.int8_layers``), or at int2 as int4 rows (``kv_cache.int4_layers``).

Measured on SmolLM2 (``hf_vram.kvcache.kivi``'s docstring): at 8k tokens one layer's int4 K/V costs +0.34% perplexity
and three more +0.15-0.17% each, while 21 of 30 layers cost under +0.06%. Those few layers as int8 take back much
of int4's loss (``benchmarks/long_context.py``, AVX-512 EPYC): layers 18 and 20 bring plain int4 from +1.56% to
+0.96% at 0.305x of bfloat16's bytes instead of 0.283x, layer 18 with values turned +0.94% to +0.66% at 0.295x
instead of 0.286x. Transformers' continuous-batching cache gives all full-attention layers one allocator with one
row size, so a widened layer takes several pages of the block instead of a second allocator (``wide_span``: 2 at
int4, 4 at int2): its int8 rows (``KVCodec``: ``H * (D + 2)`` bytes) sit in rows that many int4/int2 rows wide (at
int4 and head_dim 64 an int8 row fills 92% of it), keys in its first half and values in its second, written as
their tokens come (no window). Blocks stay what Transformers shares, hashes, forks and offloads; only the block's
page count grows. The int4 window then keeps blocks of its own rather than host its group in that group's page block
(``group_window``), where the widened layers' rows are written at once.
``wide_index`` maps a physical index (the token's row in a one-page layout) to its row in the wide view.

At int2 an int8 layer takes four pages, which no window that fits 0.18x of bfloat16's bytes pays for; there
``kv_cache.int4_layers`` widens to int4 instead: KIVI rows of 4 bits (108 bytes for SmolLM2, 103 with values turned) in rows two int2 rows
wide (120), written, sealed and read like the int2 layers' (the same int8 window, the same groups), by a second
codec. A section widens to one width (``wide_layers``). ``benchmarks/long_context.py`` on SmolLM2 (AVX-512 EPYC):
int2 with two lagging groups instead of three, values turned and one layer in int4 gives +2.50% perplexity at 8k and
a passkey in 26 of 40 prompts (bfloat16's count) at 0.178x bfloat16's bytes, where plain int2 gives +3.54% and 23 at
0.177x (2-bit keys of a width per channel, ``kivi.key_widths``; with one width for all: +6.20% / 23, +10.18% / 10).
"""

from __future__ import annotations

import math

import torch
from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

from hf_vram.config import kv_cache_section
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import WINDOWED_BITS, WindowedKVCodec


def int8_layers(config) -> tuple[int, ...]:
    """The layers of ``config``'s model whose int4/int2 K/V pages are int8 (``kv_cache.int8_layers``), checked
    against its layer count; none for other models."""
    return _listed_layers(config, "int8_layers")


def int4_layers(config) -> tuple[int, ...]:
    """The layers of ``config``'s model whose int2 K/V pages are int4 (``kv_cache.int4_layers``), checked as
    ``int8_layers``."""
    return _listed_layers(config, "int4_layers")


def widening(section) -> tuple[int, int | list[int]]:
    """``(bits, chosen)`` of a ``kv_cache`` section: the width it widens layers to (4 where ``int4_layers`` is set,
    else 8; a section widens to one) and that field as set (a list, a count not yet chosen, or ``()``)."""
    four = getattr(section, "int4_layers", None)
    return (4, four) if four else (8, getattr(section, "int8_layers", None) or ())


def counted_width(section) -> str | None:
    """The ``kv_cache`` field holding a count of layers still to choose (``int8_layers`` or ``int4_layers``), or
    None."""
    bits, chosen = widening(section)
    return f"int{bits}_layers" if isinstance(chosen, int) else None


def wide_layers(config) -> tuple[int, tuple[int, ...]]:
    """``(bits, layers)``: the width the model's section widens layers to and which, checked (``int8_layers``)."""
    bits, _ = widening(kv_cache_section(config))
    return bits, _listed_layers(config, f"int{bits}_layers")


def _listed_layers(config, name: str) -> tuple[int, ...]:
    section = kv_cache_section(config)
    layers = getattr(section, name, None) or ()
    if isinstance(layers, int):
        raise ValueError(
            f"hf_vram KV: kv_cache.{name} is a count ({layers}) that hf_vram turns into layers when it optimizes "
            "the model (from_pretrained with this config, or hf_vram.optimize); this model was not optimized with "
            f"it: load it through hf_vram, or list the layers (kv_cache.{name}: [i, j])."
        )
    layers = tuple(layers)
    count = config.num_hidden_layers
    outside = [i for i in layers if i >= count]
    if outside:
        raise ValueError(
            f"hf_vram KV: kv_cache.{name} names layer(s) {outside}, but this model has {count} layers "
            f"(0..{count - 1}); list only its layers, or set {name} to null."
        )
    return layers


def wide_span(bits: int, num_key_value_heads: int, head_dim: int, wide_bits: int = 8) -> int:
    """One-page rows a ``wide_bits`` row (int8 ``KVCodec``, or int4 KIVI) takes at ``bits`` (int8 at int4: 2, at
    int2: 4; int4 at int2: 2), rounded up to a power of two so that a page and a block are whole numbers of wide
    rows: a widened layer takes as many pages."""
    narrow = WindowedKVCodec(bits, num_key_value_heads, head_dim).row_bytes
    if wide_bits == 8:
        wide = KVCodec(8, num_key_value_heads, head_dim).row_bytes
    else:  # an int4 row of either value format (its values turned or not, as the allocator's are)
        wide = max(WindowedKVCodec(wide_bits, num_key_value_heads, head_dim, row_scale=s).row_bytes for s in (False, True))
    return 1 << math.ceil(math.log2(wide / narrow))


def page_slots(layer_indices: list[int], wide: tuple[int, ...], span: int) -> tuple[dict[int, int], int]:
    """Each layer's first page in a block (a widened layer takes ``span``: its keys, then its values) and the
    block's page count."""
    slots, at = {}, 0
    for layer in layer_indices:
        slots[layer] = at
        at += span if layer in wide else 1
    return slots, at


def slot_count(config, bits: int) -> int:
    """Pages one block of ``bits``-bit K/V holds for the model of ``config`` (every layer full attention): one per
    layer, ``wide_span`` per widened layer."""
    section = kv_cache_section(config)
    wide = widened_count(section) if bits in WINDOWED_BITS else 0
    if not wide:
        return config.num_hidden_layers
    span = wide_span(bits, find_num_key_value_heads(config), find_head_dim(config), widening(section)[0])
    return config.num_hidden_layers + wide * (span - 1)


def widened_count(section) -> int:
    """How many layers a ``kv_cache`` section widens (to int8, or at int2 to int4; a count not yet turned into
    layers included)."""
    _, layers = widening(section)
    return layers if isinstance(layers, int) else len(layers)


def wide_index(rows: torch.Tensor, block_stride: int, span: int) -> torch.Tensor:
    """The rows of a wide view (``span`` one-page rows each) that physical indices ``rows`` address: a block of
    ``block_stride`` one-page rows is ``block_stride / span`` wide ones, and a token keeps its place in its page."""
    return rows - (rows // block_stride) * (block_stride - block_stride // span)
