"""4- and 2-bit K/V in the manner of KIVI (arXiv 2402.02750): keys per channel over groups of tokens, values per
token over groups of channels.

Keys carry a few outlier channels whose magnitude is stable across tokens; rounding each token on its own (per-token
scales) spends the 4-bit range on them, and neither a Hadamard rotation nor per-channel smoothing undoes that
(measured on SmolLM2, 2048-token pydoc windows, group 64: +7.4% perplexity at int4 with either). Scaling each
channel over a group of tokens instead is +0.5% with groups of 64 tokens, +0.3% with 32 (a prototype of the same
two windows); 64 is the default because its rows are smaller (0.28x of bfloat16 against 0.31x at int4, 0.16x against
0.19x at int2). A key group can only be quantized once its ``group`` tokens exist, so the tokens of an unfinished
group wait in int8 rows (the paged allocator's window, ``group_window``: half of bfloat16's bytes) until it fills,
and the group is then quantized once from them, never again (at 2 bits the window also keeps a request's first group
and its last 3 whole groups, and keys are clipped: ``WindowPolicy``; ``kv_cache.sink_tokens`` / ``recent_tokens`` set
the groups kept at either width). At int4, and at int2 with ``kv_cache.rotate_values``, values are stored turned by a Hadamard matrix
(``value_rotation``: the cache turns them, the attention turns its output back). Keys are quantized turned back to before their rotary embedding (``rope_frame``: +0.85% perplexity
at 8k tokens instead of +1.22%, ``benchmarks/long_context.py``), so a key group's codec needs the position of its first token.

Where int4 loses at 8k (a prototype outside ``benchmarks/``, 2026-12-04, AMD EPYC AVX-512, SmolLM2, the first
8192-token pydoc window read back as decode by ``quantized_kv_attention``'s attentions, chosen per layer): the
same pages cost +1.19% perplexity in float32 and +1.81% / +1.65% / +1.32% in bfloat16 on torch's AVX512 / AVX2 /
default CPU paths (the bfloat16 reference's own rounding moves it; two windows in float32 +1.16%). Keys carry
most of it (keys alone +0.94%, values alone +0.29%), and a few layers most of that: only layer 18's K/V quantized
+0.34% (its keys alone +0.32%), only 19, 20 or 24 +0.15-0.17%, 21 of the 30 layers under +0.06%. Reading layers
18 and 20 as int8 pages instead gives +0.68% (float32; two windows +0.85%; bfloat16 +0.81%) for 0.301x of
bfloat16's bytes instead of 0.286x: a K/V width per layer, chosen by this reading, is the lever for int4's 8k
target, built as ``kv_cache.int8_layers`` (``layer_widths``: a widened layer takes two int4 pages of each block,
four int2 ones; ``readback.int8_layers_by_readback`` chooses them on calibration text). Tried in the same reading:
each key group's token farthest from the group's mean kept exact (+0.97%, about 1.5% more bytes), the widest 2 / 4
/ 8 channels of each group kept exact (+1.09% / +1.23% / +0.57%: no steady gain).

At 2 bits each key channel of a (group, head) takes 0, 2 or 4 bits, 2 on average (``key_widths``): the same bytes,
a third of int2's loss at 8k (+4.77% perplexity instead of +13.00%, the reading above); see there.

Storage, for ``[tokens, heads, head_dim]`` states: a row of ``code_bytes`` packed codes per token, plus
``meta_bytes`` of float16 meta (``row_layout``). A value row starts its meta with its own: at int4 one symmetric scale
for the row (``WindowedKVCodec``'s ``row_scale``: values always turned there), at int2 a (scale, low) per ``group``
channels of each head (or fewer: ``value_group``); keys keep their group's per-channel (scale, low), about ``heads *
head_dim * 4 / group`` bytes a token, spread over the meta bytes of the group's key rows and then over the rest of
its value rows' (a group's K and V rows are written together, when it is sealed). Rows of keys and values have one
size, which Transformers' page layout (one row size per allocator) needs: for SmolLM2 103 bytes at int4 (108 with a
(scale, low) per head, which left the key rows' meta the larger), 60 at int2. Three bytes instead of four per (scale,
low) pair would have made that 108-byte int4 row 105 bytes (about 3% more sequences in a budget); tried in the read-back
(2026-12-05, SmolLM2 bfloat16, 4 pydoc windows of 2048 tokens, int4 +0.72% as stored): the low as an int8 multiple of
the scale +1.11%, the scale in float8 (e4m3, rounded up) +1.22%, both past int4's +1.0% target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from hf_vram.kvcache.codec import SCALE_DTYPE, pack, unpack_to
from hf_vram.kvcache.rope_frame import RopeFrame

WINDOWED_BITS = (4, 2)
GROUP = 64  # tokens per key group, channels per value group (at most)
ROW_SCALE_BITS = 4  # the width whose value rows take one symmetric scale (``WindowedKVCodec``'s ``row_scale``)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(13))  # 1.0 .. 0.4: the key ranges tried by ``_quantize_clipped``
WIDTH_BITS = 2  # the width whose key channels take 0, 2 or 4 bits each (``key_widths``), 2 a channel on average
TINY_SCALE = 2.0**-24  # float16's least positive value: a channel given bits never stores a zero scale


@dataclass(frozen=True)
class WindowPolicy:
    """What stays in the int8 window besides each request's unfinished key group, and how keys are rounded.

    ``sink_groups``: a request's first groups (the attention sink: the first tokens, which every later query attends
    to, carry key outliers that a 2-bit channel range cannot hold). ``lag_groups``: the last whole groups, quantized
    only once that many newer groups have filled (recent tokens draw most of the attention, like KIVI's residual).
    ``clip_keys``: each key channel's range shrunk to the least squared error (``CLIP_RATIOS``) instead of min-max.
    ``rotate_values``: values stored turned by a Hadamard matrix (``value_rotation``): always at int4, whose value
    rows keep one symmetric scale for turned values (``WindowedKVCodec``), at int2 where ``kv_cache.rotate_values``
    asks (see there for what it measured).

    Measured on SmolLM2, two 2048-token pydoc windows read as decode (``quantized_kv_attention``), against bfloat16
    K/V: int2 plain +42.9%; first group kept +31.2%; first group and 3 lagging groups +14.4%; those and clipped
    keys +5.9% (4 lagging groups +3.5%, but past 0.18x of bfloat16's bytes at 8k). Clipping alone is worse (+57.8%):
    the sink's outliers are clipped away. At int4 none of it helps (+0.66% plain; +0.72% with the first group, +0.72%
    with one lagging group; clipped keys +1.20%), but retrieval does: a passkey in pydoc text (a prototype over the
    30 prompts of 1k-4k tokens of ``benchmarks/long_context.py``, through continuous batching, one thread) is found in 24 by bfloat16 K/V, 24 by int4
    with the first group and one lagging group (the same prompts), 23 with the first group alone, 24 with two
    lagging groups, 22 with one lagging group alone and 22 plain. Those two groups cost little at 8k (0.29x of
    bfloat16's bytes instead of 0.286x) but triple a request's window, which continuous batching's many short
    requests pay for (2.0x bfloat16's concurrent sequences at one budget instead of 3.0x, ``benchmarks/batching.py``).
    In the benchmark itself (40 prompts of 1k-8k tokens) they find it in 25, plain int4 in 23, bfloat16 in 26. So int4
    keeps the plain window by default, and long contexts ask for the groups with ``kv_cache.sink_tokens: 64,
    recent_tokens: 64``. Tried and dropped: int4 values to their pages at once (per token, they need no group),
    which would halve int4's window but reads the unfinished group's values quantized: +1.14% over four 2048-token
    windows instead of +0.63%, past the +1% target. Also tried (2026-12-02, a prototype reading each passkey prompt's
    prefilled K/V back as the pages would, SmolLM2 float32): keeping a key group's values farthest from their
    channel's median in float16 (KVQuant's dense-and-sparse). What int4 loses is in the keys (int4 keys with int8
    values found 15 of the 20 1k/2k prompts, int8 keys with int4 values 17, as float32), but outliers did not
    reliably win it back (1 in 96 values: 23 of 30 1k-4k prompts, none 22, float32 24) and cost 0.307x of bfloat16's
    bytes. At int2 they are the lever for retrieval (4 of 20 -> 14 with 1 in 100) but only past 0.18x: 1 in 192, what
    fits beside one lagging group, found 7 and raised 2k perplexity to +7.8% (the default +6.4%).
    Tried at int2 since (2026-12-04, SmolLM2 float32, two pydoc windows read back as decode, the int2 window as
    above; 2048 / 8192 tokens): the default +6.44% / +9.93%; values turned (``rotate_values``) +5.67% / +9.32%;
    values clipped like keys +9.00% at 2k (a value's rare extremes are what attention reads); keys turned by a
    Hadamard matrix after their rotary embedding, where a reader turns the query once instead of every key,
    +6.02% / +9.34% (with values turned: +8.54% at 8k; at int4 +0.80% against the rotary frame's +0.33% at 2k);
    before it +4.97% at 2k, +7.99% at 8k with values turned, but every read would turn every key; the softmax
    corrected for the keys' rounding (each quantized key's logit lowered by half the variance its rounding adds,
    ``q`` against the channels' steps): +9.3% at 2k, raised instead +9.7%. None reaches +5% at 8k within 0.18x of
    bfloat16's bytes; more bits for keys would (3-bit keys and 2-bit values turned: +1.46% at 2k), but cost more
    than 0.18x, and Transformers' one row size for keys and values does not let a layout give keys alone more.
    Non-uniform levels (2026-12-04, same reading, 2048 tokens): codes standing for {0, a, 3 - a, 3} steps instead of
    {0, 1, 2, 3} (byte-neutral, KVQuant's idea without its learned codebooks): keys a = 0.8 +7.52%, 1.2 +6.67%;
    values a = 0.8 +6.49%, 0.6 +7.51%, 0.4 +9.32%; against the uniform +6.56%: clipped key ranges already place
    the levels, and values gain nothing measurable.
    A K/V width per layer at int2 (2026-12-05, a prototype outside ``benchmarks/``: SmolLM2 float32, the first
    8192-token pydoc window read back as decode, some layers read as int4 pages instead): each layer's own loss
    (``readback.layer_losses``, 2048 calibration tokens, no sink or lag) puts layer 18 far ahead (0.148 nats of
    0.627 summed; then 17, 23, 20), as at int4. Against bfloat16 K/V: the default +13.00% (0.177x of bfloat16's
    bytes at 8k), values turned +12.81%; 2 lagging groups and layer 18 in int4 +8.84% (0.178x: the lag's third
    group pays for the layer's second page), the same with values turned +8.28%; 3 lagging groups and layer 18
    +8.13%, and 17 too +7.71% (0.182x / 0.187x: past 0.18x); 1 lagging group and layers 18, 17 +10.94%; no sink
    and 2 lagging groups with them +32.4%. So int4-width layers in int2 pages (an int8 layer takes 4 int2 pages,
    which no window that fits 0.18x pays for) take about a third off int2's loss at 8k within its bytes, not to +5%:
    built as ``kv_cache.int4_layers`` (``layer_widths``; with ``recent_tokens: 128``). In ``benchmarks/long_context.py``
    (two windows, bfloat16) that with values turned and layer 18: +6.20% and 23 of 40 passkeys (plain int2 +10.18%,
    10; bfloat16 26) at 0.178x. What moved int2 most was not the window but the key bits within a group: a width
    per channel (``key_widths``, 2026-12-05, same reading): this default window +4.77% instead of +13.00%, with 2
    lagging groups, values turned and layer 18 in int4 +2.83% instead of +8.28%, in the same bytes. In
    ``benchmarks/long_context.py`` then: plain int2 +3.54% and 23 of 40 passkeys; 2 lagging groups, values turned
    and one int4 layer (13, chosen anew) +2.50% and 26 of 40, bfloat16's count, at 0.178x.
    """

    sink_groups: int = 0
    lag_groups: int = 0
    clip_keys: bool = False
    rotate_values: bool = False

    @property
    def window_groups(self) -> int:
        """Groups one request's window holds: the sink, the lagging groups and the unfinished one."""
        return self.sink_groups + self.lag_groups + 1

    def place(self, index: int | torch.Tensor) -> int | torch.Tensor:
        """The window place of a request's ``index``-th group (or of a tensor of them): the sink's own, else a
        ring over the rest."""
        ring = self.sink_groups + index % (self.lag_groups + 1)
        if isinstance(index, torch.Tensor):
            return torch.where(index < self.sink_groups, index, ring)
        return index if index < self.sink_groups else ring


POLICIES = {4: WindowPolicy(rotate_values=True), 2: WindowPolicy(sink_groups=1, lag_groups=3, clip_keys=True)}


def row_scale(bits: int, policy: WindowPolicy) -> bool:
    """Whether ``bits``-bit value rows take one symmetric scale (``WindowedKVCodec``): int4's, where values are
    turned (int4 pages always turn them; an int4 layer in int2 pages as its allocator does)."""
    return bits == ROW_SCALE_BITS and policy.rotate_values


def window_policy(bits: int, section: object | None = None) -> WindowPolicy:
    """The int8 window and key rounding of ``bits``-bit K/V (see ``WindowPolicy``); a ``kv_cache`` config section's
    ``sink_tokens`` and ``recent_tokens``, where set, replace the default sink and lagging groups."""
    if bits not in POLICIES:
        raise ValueError(f"hf_vram KIVI KV: bits={bits!r} is invalid; allowed: {', '.join(map(str, WINDOWED_BITS))}.")
    policy = POLICIES[bits]
    sink, recent = getattr(section, "sink_tokens", None), getattr(section, "recent_tokens", None)
    if sink is not None:
        policy = replace(policy, sink_groups=sink // GROUP)
    if recent is not None:
        policy = replace(policy, lag_groups=recent // GROUP)
    if getattr(section, "rotate_values", False):
        policy = replace(policy, rotate_values=True)
    return policy


def value_group(head_dim: int, group: int = GROUP) -> int:
    """Channels per value group: ``group``, or the largest divisor of ``head_dim`` below it (16 for head_dim 80)."""
    return math.gcd(head_dim, group)


def row_layout(bits: int, num_heads: int, head_dim: int, group: int = GROUP, row_scale: bool = False) -> tuple[int, int, int]:
    """``(code_bytes, meta_bytes, value_meta_bytes)`` of one token row: codes, then ``meta_bytes`` of meta. A value
    row's own meta is its first ``value_meta_bytes`` (one float16 scale with ``row_scale``, else a (scale, low) per
    head and ``value_group`` channels); a key group's (scale, low) per channel fill the meta bytes of its key rows,
    then the rest of its value rows' (the same tokens' rows: a group's K and V rows are written together). Rows of
    keys and values have one size (Transformers' page layout), the least that holds both."""
    if bits not in WINDOWED_BITS:
        raise ValueError(f"hf_vram KIVI KV: bits={bits!r} is invalid; allowed: {', '.join(map(str, WINDOWED_BITS))}.")
    if (head_dim * bits) % 8:
        raise ValueError(f"hf_vram KIVI KV: head_dim {head_dim} at {bits} bits is not a whole number of bytes.")
    code_bytes = num_heads * head_dim * bits // 8
    key_meta = -(-num_heads * head_dim * 2 * SCALE_DTYPE.itemsize // group)  # a key group's meta, per token
    value_meta = (
        SCALE_DTYPE.itemsize if row_scale else num_heads * head_dim // value_group(head_dim, group) * 2 * SCALE_DTYPE.itemsize
    )
    return code_bytes, max(value_meta, -(-(key_meta + value_meta) // 2)), value_meta


def _quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric ``bits``-bit codes of float32 ``x`` with (scale, low) reduced over ``dim``."""
    levels = (1 << bits) - 1
    low = x.amin(dim, keepdim=True).to(SCALE_DTYPE)
    scale = ((x.amax(dim, keepdim=True) - low.float()) / levels).to(SCALE_DTYPE)
    codes = torch.round((x - low.float()) / scale.float().clamp_min(1e-8)).clamp_(0, levels)
    return codes, scale, low


def _quantize_clipped(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_quantize`` with each range (over ``dim``) shrunk about its middle by the ratio in ``CLIP_RATIOS`` whose
    rounding has the least squared error: at 2 bits the outermost of 4 levels otherwise sits on a rare extreme."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    middle, half = (lo + hi) / 2, (hi - lo) / 2
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for ratio in CLIP_RATIOS:
        low = (middle - half * ratio).to(SCALE_DTYPE)
        scale = ((middle + half * ratio - low.float()) / levels).to(SCALE_DTYPE)
        codes = torch.round((x - low.float()) / scale.float().clamp_min(1e-8)).clamp_(0, levels)
        error = (codes * scale.float() + low.float() - x).square_().sum(dim, keepdim=True)
        if best is None:
            best = (error, codes, scale, low)
            continue
        better = error < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip((error, codes, scale, low), best, strict=True))
    return best[1], best[2], best[3]


def key_widths(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-bit keys ``x`` ``[n, group, H, D]`` (float32) with each channel of a (group, head) given 0, 2 or 4 bits, 2
    on average: the widths of least squared error (each channel's error at each width, then the ``D`` largest of its
    two gains, 0 -> 2 and 2 -> 4 bits, taken over the head, the second gain capped by the first). Returns the slot
    codes ``[n, group, H, D]`` in ``0..3`` and the per-channel ``(scale, low)`` ``[n, 1, H, D]`` float16, the width
    in the scale: 0 (low is the channel's mean), positive (2 bits, one slot), negative (4 bits, two slots: the low 2
    bits, then the high 2). A channel's slots follow those of the channels before it (``slot_map``).

    Why: a head's key channels differ by orders of magnitude in range, and a 2-bit code on each spends as many bits on
    a flat channel as on an outlier. Measured (SmolLM2 float32, the first 8192-token pydoc window read back as decode
    by ``quantized_kv_attention``, the int2 window of ``WindowPolicy``): +4.77% perplexity against bfloat16 K/V
    instead of +13.00%, in the same bytes; with 2 lagging groups, values turned and layer 18 in int4 pages +2.83%
    (+8.28%); ``benchmarks/long_context.py``: see ``WindowPolicy``. Widths over blocks of 2, 4 or 8 neighbouring
    channels instead of the whole head (a prototype): +13.5% to +14.3%, no gain. At 4 bits widths of 0, 4 or 8 bits
    gain little (+1.15% instead of +1.37%, the same reading), so int4 keeps one width."""
    n, group, heads, d = x.shape
    mean = x.double().mean(1, keepdim=True).to(SCALE_DTYPE)
    errors, quantized = [(mean.double() - x.double()).square().sum(1, keepdim=True)], []
    for bits in (2, 4):
        codes, scale, low = _quantize_clipped(x, bits, 1)
        quantized.append((codes, scale, low))
        errors.append((codes.double() * scale.double() + low.double() - x.double()).square().sum(1, keepdim=True))
    first, second = errors[0] - errors[1], errors[1] - errors[2]
    gains = torch.cat([first, torch.minimum(second, first)], -1)  # [n, 1, H, 2D]
    chosen = gains.sort(dim=-1, descending=True, stable=True).indices[..., :d]
    taken = torch.zeros_like(gains).scatter_(-1, chosen, 1.0)
    slots = (taken[..., :d] + taken[..., d:]).long()  # 0, 1 or 2 slots of 2 bits
    (codes2, scale2, low2), (codes4, scale4, low4) = quantized
    scale = torch.where(slots == 2, -scale4.float().clamp_min(TINY_SCALE), scale2.float().clamp_min(TINY_SCALE))
    scale = torch.where(slots == 0, 0.0, scale).to(SCALE_DTYPE)
    low = torch.where(slots == 0, mean, torch.where(slots == 2, low4, low2))
    codes = torch.where(slots == 2, codes4, codes2).long()
    first_slot = (slots.cumsum(-1) - slots).expand(-1, group, -1, -1)
    out = torch.zeros(n, group, heads, d, dtype=torch.long, device=x.device)
    out.scatter_add_(-1, first_slot.clamp(max=d - 1), torch.where(slots > 0, codes & 3, 0))
    out.scatter_add_(-1, (first_slot + 1).clamp(max=d - 1), torch.where(slots == 2, codes >> 2, 0))
    return out, scale, low


def slot_map(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where ``key_widths``' channels read their code: from the signed float32 ``scale`` ``[..., D]``, each channel's
    first and second slot (int64; a channel without one points at a slot it multiplies by 0) and their factors, so a
    key is ``low + slot[lo] * a + slot[hi] * b``. The kernels compute the same map."""
    slots = torch.where(scale == 0, 0, torch.where(scale < 0, 2, 1))
    first = slots.cumsum(-1) - slots
    d = scale.shape[-1]
    a = torch.where(slots > 0, scale.abs(), 0.0)
    b = torch.where(slots == 2, 4 * scale.abs(), 0.0)
    return first.clamp(max=d - 1), (first + 1).clamp(max=d - 1), a, b


class WindowedKVCodec:
    """Encode and decode KIVI-style rows for one layer shape (``num_heads`` KV heads of ``head_dim``); with a
    ``frame``, keys are quantized turned back by their positions (each key group's first token at ``starts``).

    ``row_scale`` (int4's default): each value row is rounded to ``2**bits`` levels symmetric about zero at half
    steps (``(code - 7.5) * scale`` at int4, no level wasted on an exact zero) with one float16 scale for all its heads,
    ``value_group`` 0; for values turned by ``value_rotation`` (int4 always turns them), whose channels a Hadamard
    matrix has evened out. Read back on SmolLM2 (bfloat16, 2048-token pydoc windows, int4 pages, a prototype
    outside ``benchmarks/``, 2026-12-05): +0.48% perplexity over the first 4 windows and +0.71% over the next 8,
    against +0.72% / +0.86% with unturned values and a (scale, low) per head, and +0.75% / +0.92% for those turned;
    a scale per head instead +0.72% / +1.03% (turned), unturned with one scale +1.80% / +1.62%. Its 2 bytes of meta
    instead of 12 leave room in the value rows for part of the key groups' meta, so rows are 103 bytes for SmolLM2
    instead of 108: 5% more tokens in a budget."""

    def __init__(
        self,
        bits: int,
        num_heads: int,
        head_dim: int,
        group: int = GROUP,
        frame: RopeFrame | None = None,
        row_scale: bool | None = None,
    ) -> None:
        self.bits, self.num_heads, self.head_dim, self.group = bits, num_heads, head_dim, group
        self.row_scale = bits == ROW_SCALE_BITS if row_scale is None else row_scale
        self.code_bytes, self.meta_bytes, self.value_meta_bytes = row_layout(bits, num_heads, head_dim, group, self.row_scale)
        self.key_meta_bytes = self.meta_bytes  # a key row's meta: all of it the key group's
        self.value_group = 0 if self.row_scale else value_group(head_dim, group)  # 0: one symmetric scale a row
        self.clip_keys = window_policy(bits).clip_keys
        self._quantize_keys = _quantize_clipped if self.clip_keys else _quantize
        self.row_bytes = self.code_bytes + self.meta_bytes
        self.frame = frame
        self._offsets = torch.arange(group)

    def key_angles(
        self, starts: torch.Tensor | None, dtype: torch.dtype, back: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The frame's angles for key groups starting at ``starts`` (``[n, group, 1, head_dim]``), or None without
        a frame. ``decode_keys`` takes them precomputed, so the layers of a step share one computation."""
        if self.frame is None:
            return None
        if starts is None:
            raise ValueError("hf_vram KIVI KV: keys in the rotary frame need their groups' start positions.")
        return self.frame.angles(starts[:, None] + self._offsets.to(starts.device), dtype, back)

    def seal_tables(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The backward rotary tables of whole groups starting at ``starts`` as hf_vram's sealer takes them
        (``hf_vram.kernels.kivi_write``: ``[n * group, head_dim]`` cos and signed sin, and the pair count), or empty
        ones where keys are not turned."""
        angles = self.key_angles(starts, torch.float32, back=True)
        if angles is None:
            return torch.empty(0), torch.empty(0), 0
        cos, sin = (a.reshape(-1, self.head_dim).contiguous() for a in angles)
        return cos, sin, self.frame.pairs

    # keys: [n_groups, group, H, D] <-> n_groups * group rows, their meta partly in the same tokens' value rows
    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole groups: keys ``[n, group, H, D]`` and the same tokens' values ``[n * group, H, D]`` -> their key
        rows and value rows ``[n * group, row_bytes]`` uint8; keys per channel (scale, low) over each group."""
        n, x = keys.shape[0], keys.float()
        angles = self.key_angles(starts, torch.float32, back=True)
        if angles is not None:
            x = self.frame.turn(x, *angles)
        if self.bits == WIDTH_BITS:
            codes, scale, low = key_widths(x)
        else:
            codes, scale, low = self._quantize_keys(x, self.bits, 1)  # scale/low: [n, 1, H, D]
        packed = pack(codes, self.bits).reshape(n, self.group, self.code_bytes)
        meta = torch.cat([scale, low], 1).view(torch.uint8).reshape(n, -1)
        in_keys, tail = self.group * self.meta_bytes, self.meta_bytes - self.value_meta_bytes
        meta = torch.nn.functional.pad(meta, (0, in_keys + self.group * tail - meta.shape[1]))
        key_rows = torch.cat([packed, meta[:, :in_keys].reshape(n, self.group, self.meta_bytes)], 2)
        value_rows = self.encode_values(values)
        if tail:
            value_rows[:, self.code_bytes + self.value_meta_bytes :] = meta[:, in_keys:].reshape(n * self.group, tail)
        return key_rows.reshape(n * self.group, self.row_bytes), value_rows

    def decode_keys(
        self,
        rows: torch.Tensor,
        value_rows: torch.Tensor | None,
        dtype: torch.dtype,
        starts: torch.Tensor | None = None,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[n * group, row_bytes]`` uint8 key rows of whole groups and their ``value_rows`` -> ``[n * group, H,
        D]`` in ``dtype``; with a frame, the groups' ``starts`` or their float32 ``key_angles``. Computed in float32
        whatever ``dtype`` is: the turn forward in bfloat16 (its angles rounded to 8 bits) adds its own error to
        every key, measured on SmolLM2 (four 2048-token pydoc windows read as decode, bfloat16 model) as int4 +0.93%
        perplexity against +0.72% in float32 (``benchmarks/batching.py``); and no slower on CPU (its int4 row
        alone: 67.9 tokens/s, 67.7 before)."""
        n = rows.shape[0] // self.group
        grouped = rows.view(n, self.group, self.row_bytes)
        f32 = torch.float32
        q = unpack_to(grouped[:, :, : self.code_bytes].reshape(n, self.group, self.num_heads, -1), self.bits, f32)
        grouped_values = value_rows.view(n, self.group, -1) if self.key_meta_in_values else None
        meta = self.group_meta(grouped, grouped_values).to(f32)  # [n, 2, H, D]
        if self.bits == WIDTH_BITS:  # codes are slots: each channel's own, at the offsets its width gives
            lo, hi, a, b = (x.expand(-1, self.group, -1, -1) for x in slot_map(meta[:, 0:1]))
            q = torch.addcmul(meta[:, 1:2], q.gather(-1, lo), a).addcmul_(q.gather(-1, hi), b)
        else:
            q = torch.addcmul(meta[:, 1:2], q, meta[:, 0:1])
        if self.frame is not None:
            q = self.frame.turn(q, *(angles if angles is not None else self.key_angles(starts, f32)))
        return q.reshape(n * self.group, self.num_heads, self.head_dim).to(dtype)

    @property
    def key_meta_in_values(self) -> bool:
        """Whether a key group's meta continues in its value rows (readers gather those rows only then)."""
        return self.meta_bytes > self.value_meta_bytes

    def group_meta(self, grouped: torch.Tensor, grouped_values: torch.Tensor | None) -> torch.Tensor:
        """``[n, group, row_bytes]`` key rows of whole key groups and their value rows (None where
        ``key_meta_in_values`` is false) -> the groups' ``[n, 2, H, D]`` (scale, low): the key rows' meta bytes, then
        the rest of the value rows' after their own."""
        n, code = grouped.shape[0], self.code_bytes
        meta = grouped[:, :, code : code + self.meta_bytes].reshape(n, -1)
        if self.key_meta_in_values:
            tail = grouped_values[:, :, code + self.value_meta_bytes : code + self.meta_bytes].reshape(n, -1)
            meta = torch.cat([meta, tail], 1)
        size = 2 * self.num_heads * self.head_dim * SCALE_DTYPE.itemsize
        return meta[:, :size].view(SCALE_DTYPE).reshape(n, 2, self.num_heads, self.head_dim)

    # values: [T, H, D] <-> T rows
    def encode_values(self, values: torch.Tensor) -> torch.Tensor:
        """``[T, H, D]`` -> ``[T, row_bytes]``: with ``row_scale`` one symmetric scale per token, else (scale, low)
        per token and group of channels; the bytes after them (key meta, ``encode``) zero."""
        t = values.shape[0]
        if self.row_scale:
            x, half = values.float().reshape(t, -1), ((1 << self.bits) - 1) / 2
            scale = (x.abs().amax(1, keepdim=True) / half).to(SCALE_DTYPE)
            codes = (x / scale.float().clamp_min(1e-8) + half).round_().clamp_(0, 2 * half)
            packed = pack(codes.reshape(t, self.num_heads, self.head_dim), self.bits).reshape(t, self.code_bytes)
            meta = scale.view(torch.uint8)
        else:
            grouped = values.float().reshape(t, self.num_heads, self.head_dim // self.value_group, self.value_group)
            codes, scale, low = _quantize(grouped, self.bits, 3)
            packed = pack(codes.reshape(t, self.num_heads, self.head_dim), self.bits).reshape(t, self.code_bytes)
            meta = torch.cat([scale, low], 3).view(torch.uint8).reshape(t, -1)
        return torch.nn.functional.pad(torch.cat([packed, meta], 1), (0, self.row_bytes - self.code_bytes - meta.shape[1]))

    def decode_values(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[T, row_bytes]`` -> ``[T, H, D]`` in ``dtype``, computed in float32 (as ``decode_keys``: one rounding)."""
        t, h, d, f32 = rows.shape[0], self.num_heads, self.head_dim, torch.float32
        q = unpack_to(rows[:, : self.code_bytes].reshape(t, h, d * self.bits // 8), self.bits, f32)
        if self.row_scale:  # code * scale + low, low = -half * scale: exact in float32, as every kernel computes it
            scale = rows[:, self.code_bytes : self.code_bytes + 2].contiguous().view(SCALE_DTYPE).to(f32)[:, :, None]
            return q.mul_(scale).add_(scale * -(((1 << self.bits) - 1) / 2)).to(dtype)
        g = self.value_group
        size = h * d // g * 2 * SCALE_DTYPE.itemsize
        meta = rows[:, self.code_bytes : self.code_bytes + size].view(SCALE_DTYPE).reshape(t, h, d // g, 2)
        scale, low = meta[..., 0:1].to(f32), meta[..., 1:2].to(f32)  # contiguous: broadcasts run fast
        return q.reshape(t, h, d // g, g).mul_(scale).add_(low).reshape(t, h, d).to(dtype)
