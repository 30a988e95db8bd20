"""K/V read back as hf_vram's quantized pages hold them, inside a plain forward: what each query of a model sees when
its past comes from int8 pages (the per-token codec) or int4/int2 pages (KIVI-style groups, the int8 window), for
measuring K/V quality with ``perplexity`` or a calibration loss instead of a serving run. The evaluation helpers and
the planner (which weighs K/V storages by their measured loss) both use it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_vram.config import kv_cache_section
from hf_vram.data import default_calibration_ids
from hf_vram.kvcache import layer_widths
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import GROUP, WINDOWED_BITS, WindowedKVCodec, WindowPolicy, row_scale, window_policy
from hf_vram.kvcache.rope_frame import RopeFrame
from hf_vram.kvcache.value_rotation import rotate, value_rotation


def _codec_attention(bits: int, base):
    """8 bits: every past token read back through the per-token codec, then ``base`` attention."""
    codecs: dict[tuple, tuple[KVCodec, KVCodec]] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        b, h, t, d = key.shape
        if (h, d) not in codecs:
            codecs[(h, d)] = (KVCodec(bits, h, d), KVCodec(bits, h, d))
        kc, vc = codecs[(h, d)]
        key = kc.round_trip(key.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2)
        value = vc.round_trip(value.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def window_round_trip(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, h, t, d]`` K and V as the int4/int2 pages' int8 window holds them (``GroupWindow``), as new tensors."""
    b, h, t, d = key.shape
    codec = KVCodec(8, h, d)
    k, v = (codec.round_trip(x.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2) for x in (key, value))
    return k, v


def _whole_groups_quantized(
    key: torch.Tensor, value: torch.Tensor, bits: int, group: int, frame: RopeFrame | None, policy: WindowPolicy
):
    """``[b, h, t, d]`` K and V rounded as the int8 window holds them, and every whole group of ``group`` tokens
    quantized from that rounding (keys per channel over the group, in the rotary ``frame`` of the model, values per
    token, turned by ``value_rotation`` where the ``policy`` says so, and turned back), as the pages hold them:
    ``(windowed key, windowed value, paged key, paged value)``."""
    b, h, t, d = key.shape
    codec, n = WindowedKVCodec(bits, h, d, group, frame, row_scale=row_scale(bits, policy)), t // group * group
    rotation = value_rotation(d) if policy.rotate_values else None
    key, value = window_round_trip(key, value if rotation is None else rotate(value, rotation))
    paged_key, paged_value = key.clone(), value.clone()
    if n:
        keys = key[:, :, :n].permute(0, 2, 1, 3).reshape(b * n // group, group, h, d)
        starts = torch.arange(0, n, group, device=key.device).repeat(b)
        values = value[:, :, :n].permute(0, 2, 1, 3).reshape(b * n, h, d)
        key_rows, value_rows = codec.encode(keys, values, starts)
        keys = codec.decode_keys(key_rows, value_rows, key.dtype, starts)
        paged_key[:, :, :n] = keys.reshape(b, n, h, d).permute(0, 2, 1, 3)
        values = codec.decode_values(value_rows, value.dtype)
        paged_value[:, :, :n] = values.reshape(b, n, h, d).permute(0, 2, 1, 3)
    if rotation is not None:
        value, paged_value = rotate(value, rotation), rotate(paged_value, rotation)
    return key, value, paged_key, paged_value


def windowed_round_trip(
    key: torch.Tensor,
    value: torch.Tensor,
    bits: int,
    group: int = GROUP,
    frame: RopeFrame | None = None,
    policy: WindowPolicy | None = None,
):
    """``[b, h, t, d]`` K and V (positions 0 .. t-1) as int4/int2 pages and their int8 window return them to the
    query at position t-1: the groups the window holds (``window_policy``: the sink, the last lagging whole groups,
    the unfinished one) in int8, every other whole group quantized from that int8 rounding, as the pages do.
    ``policy``: the window's (``kv_cache.sink_tokens`` / ``recent_tokens``), else the default of ``bits``."""
    policy = policy or window_policy(bits)
    key, value, paged_key, paged_value = _whole_groups_quantized(key, value, bits, group, frame, policy)
    whole = key.shape[2] // group
    for start, stop in ((0, policy.sink_groups), (whole - policy.lag_groups, whole)):
        span = slice(max(start, 0) * group, max(stop, 0) * group)
        paged_key[:, :, span], paged_value[:, :, span] = key[:, :, span], value[:, :, span]
    return paged_key, paged_value


def _windowed_attention(bits: int, policy: WindowPolicy, group: int = GROUP):
    """4 and 2 bits: what each query reads from the KIVI-style pages at its decode step: the whole groups the window
    no longer holds quantized, the rest (``window_policy``) from the int8 window. Queries run a group at a time (the
    last query of a group sees its group filled, the others see it unfinished), through SDPA with an explicit causal
    mask."""
    sink = policy.sink_groups * group

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        t = key.shape[2]
        frame = RopeFrame.for_config(module.config, key.shape[-1])
        key, value, quant_key, quant_value = _whole_groups_quantized(key, value, bits, group, frame, policy)
        quant_key[:, :, :sink], quant_value[:, :, :sink] = key[:, :, :sink], value[:, :, :sink]
        causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            causal = causal & attention_mask[..., :t, :t]
        elif attention_mask is not None:
            raise ValueError(
                "hf_vram quantized_kv_attention: int4/int2 reading takes a boolean mask (or none); this model passed "
                f"a {attention_mask.dtype} one. Evaluate it with its attention set to 'sdpa'."
            )
        out = torch.empty_like(query)
        for start in range(0, t, group):
            stop = min(start + group, t)
            spans = [(start, stop - 1, start), (stop - 1, stop, stop if stop - start == group else start)]
            for lo, hi, filled in spans:  # filled: where the group a query sits in stops being unfinished
                if hi <= lo:
                    continue
                boundary = max(filled - policy.lag_groups * group, 0)  # the window's oldest lagging group
                keys = torch.cat([quant_key[:, :, :boundary], key[:, :, boundary:hi]], 2)
                values = torch.cat([quant_value[:, :, :boundary], value[:, :, boundary:hi]], 2)
                out[:, :, lo:hi] = torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, lo:hi], keys, values, attn_mask=causal[..., lo:hi, :hi], scale=scaling, enable_gqa=True
                )
        return out.transpose(1, 2).contiguous(), None

    return attention


def _per_layer(attention, base, int8, wide: tuple[int, ...], only: tuple[int, ...] | None):
    """``attention`` in every layer but those of ``wide`` (``int8``: read as int8 pages) and, with ``only``, but
    those outside it (``base``: read exact)."""
    if not wide and only is None:
        return attention

    def dispatch(module, *args, **kwargs):
        layer = module.layer_idx
        if only is not None and layer not in only:
            return base(module, *args, **kwargs)
        return (int8 if layer in wide else attention)(module, *args, **kwargs)

    return dispatch


@contextmanager
def quantized_kv_attention(
    model,
    bits: int | None,
    policy: WindowPolicy | None = None,
    int8_layers: tuple[int, ...] | None = None,
    only_layers: tuple[int, ...] | None = None,
    int4_layers: tuple[int, ...] | None = None,
):
    """Within the block, every attention of ``model`` reads its keys and values as hf_vram's ``bits``-bit K/V pages
    in continuous batching return them at each decode step (int8: per-token codec; int4/int2: KIVI-style groups and
    window, ``hf_vram.kvcache.windowed_allocator``, as the model's ``kv_cache`` section sets it, its
    ``int8_layers`` as int8 pages, at int2 its ``int4_layers`` as int4 pages with the same window); ``bits=None``
    leaves the model as it is; ``policy`` replaces the window's, ``int8_layers`` / ``int4_layers`` the section's;
    with ``only_layers`` the other layers read their K/V exact (one layer's own loss).
    For measuring KV quality with a plain forward (``perplexity``) instead of a serving run. One difference: a query
    reads its own token back through the int8 rounding here, where the pages' step reads it as computed
    (``RowAllocator.as_computed``)."""
    if bits is None:
        yield model
        return
    original = model.config._attn_implementation
    base = ALL_ATTENTION_FUNCTIONS[original if original in ALL_ATTENTION_FUNCTIONS else "sdpa"]
    wide_attention = _codec_attention(8, base)
    if bits in WINDOWED_BITS:
        policy = policy or window_policy(bits, kv_cache_section(model.config))
        attention = _windowed_attention(bits, policy)
        if int8_layers is None and int4_layers is None:
            wide_bits, wide = layer_widths.wide_layers(model.config)
        else:
            wide_bits, wide = (4, tuple(int4_layers)) if int4_layers else (8, tuple(int8_layers or ()))
        if wide_bits == 4:  # the int2 window's sink and lag, int4 groups (KIVI's own rounding at 4 bits)
            wide_attention = _windowed_attention(4, policy)
    else:
        attention, wide = _codec_attention(bits, base), ()
    attention = _per_layer(attention, base, wide_attention, wide, only_layers)
    name = f"hf_vram_kv{bits}_eval"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(original)


@torch.inference_mode()
def layer_losses(model, ids: torch.Tensor, bits: int, policy: WindowPolicy | None = None) -> list[float]:
    """Each layer's own loss at ``bits``-bit K/V: the mean log-likelihood ``ids`` (one sequence, or ``[n, T]``)
    loses when only that layer reads its K/V back as the pages hold them, the others exact. What
    ``int8_layers_by_readback`` ranks."""
    device = next(model.parameters()).device
    batch = (ids if ids.dim() == 2 else ids.reshape(1, -1)).to(device)

    def nll(**context) -> float:
        with quantized_kv_attention(model, bits, policy=policy, int8_layers=(), **context):
            logits = model(batch).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).item()

    exact = nll(only_layers=())
    return [nll(only_layers=(layer,)) - exact for layer in range(model.config.num_hidden_layers)]


def int8_layers_by_readback(model, ids: torch.Tensor, count: int, bits: int = 4, policy: WindowPolicy | None = None) -> list[int]:
    """The ``count`` layers whose ``bits``-bit K/V lose most on calibration text ``ids`` (``layer_losses``), sorted:
    a value for ``kv_cache.int8_layers`` (or, at int2, ``int4_layers``: the ranking is the same). Calibrate on text other than what the model is then measured on.

    Ranked with every whole key group quantized (``policy``'s rounding, else the model's own, but no sink or
    recent groups kept in int8): a window that keeps them leaves a short calibration text little quantized past to
    tell layers apart by. ``benchmarks/long_context.py`` on SmolLM2 (int4, sink 64 + recent 64, values turned, 2 int8
    layers chosen on 2,048 tokens): ranked under that window, layers 11 and 28 and +0.66% perplexity at 8k, as with
    none; ranked without it, layers 18 and 20 and +0.29%."""
    policy = replace(policy or window_policy(bits, kv_cache_section(model.config)), sink_groups=0, lag_groups=0)
    losses = layer_losses(model, ids, bits, policy)
    return sorted(sorted(range(len(losses)), key=lambda layer: -losses[layer])[:count])


CALIBRATION_TOKENS = 2048  # the default text's tokens a layer choice reads (its end: perplexity reads its start)


def choose_wide_layers(model, section, ids: torch.Tensor | None) -> list[int]:
    """Turn a ``kv_cache.int8_layers`` (or ``int4_layers``) count into layers (the pipeline does so first, on the
    float model): the layers whose K/V lose most at the section's width, chosen on ``ids`` (at most
    ``2 * CALIBRATION_TOKENS`` of its windows) or the default text's last ``CALIBRATION_TOKENS``, and written back
    to the section, so the saved config lists them."""
    if ids is None:
        ids = default_calibration_ids(model, 1, CALIBRATION_TOKENS)
    ids = ids.reshape(-1, ids.shape[-1])[: max(1, 2 * CALIBRATION_TOKENS // ids.shape[-1])]
    bits, name = int(section.dtype[3:]), layer_widths.counted_width(section)
    count = min(getattr(section, name), model.config.num_hidden_layers)
    setattr(section, name, int8_layers_by_readback(model, ids, count, bits, window_policy(bits, section)))
    return getattr(section, name)
