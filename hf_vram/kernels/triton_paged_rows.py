"""Decode attention over continuous batching's quantized page rows on CUDA: the Triton twin of ``paged_decode.cpp``.

Transformers' continuous batching keeps K/V as rows found by a physical index; hf_vram's rows are int8 (``KVCodec``:
``H * D`` codes, then ``H`` float16 scales) or 4/2-bit KIVI rows (``WindowedKVCodec``: packed codes, keys' per-channel
(scale, low) of their 64-token group spread over the meta bytes of the group's key rows, then of its value rows,
at 2 bits each channel's code in the slots its width gives, ``kivi.slot_map``; values' per-token ones, or one
symmetric scale a row at int4, ``value_group`` 0; keys quantized turned
back by their rotary angle; the rows a request's window holds as int8 ``KVCodec`` rows elsewhere in the cache). Each
program (one decode, one KV head) walks the decode's rows ``BLOCK_T`` at a time: codes and meta are read and
decoded in registers, keys turned forward by their positions, the window's rows taken where ``window_*`` say, the
decode's own new token taken as computed, one online softmax over all of it in float32 for the KV head's ``G`` query
heads. Where decodes times KV heads would leave the GPU's SMs idle, several programs share a decode's rows (a stride
of row blocks each) and their softmax states are merged after (flash-decoding). Nothing is dequantized into memory.
The arguments and result are those of ``paged_decode_int8`` and ``paged_decode_kivi``; tested against the CPU
references under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.occupancy import multiprocessors

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _half_at(base_ptr, byte, mask):
        """float16 (little-endian, any alignment) at ``byte`` of a uint8 buffer, as float32."""
        lo = tl.load(base_ptr + byte, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(base_ptr + byte + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _int8_row(base_ptr, at, h, d, H, D, row_ok, d_ok):
        """``[T, BLOCK_D]``: head ``h`` of the int8 ``KVCodec`` rows starting at bytes ``at`` ``[T]``, scaled."""
        codes = tl.load(base_ptr + at[:, None] + h * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0)
        scale = _half_at(base_ptr, at + H * D + 2 * h, row_ok)
        return codes.to(tl.int8, bitcast=True).to(tl.float32) * scale[:, None]

    @triton.jit
    def _codes(base_ptr, row_at, h, d, D, mask, BITS: tl.constexpr):
        """``[T, BLOCK_D]`` unsigned codes of channels ``d`` (the low bits of a byte first)."""
        per_byte: tl.constexpr = 8 // BITS
        byte = tl.load(base_ptr + row_at[:, None] + (h * D + d[None, :]) // per_byte, mask=mask, other=0).to(tl.int32)
        return ((byte >> (BITS * (d[None, :] % per_byte))) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _meta_byte(k_ptr, v_ptr, first, byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP: tl.constexpr):
        """``byte`` of a key group's meta (from its ``first`` row), as uint16: in the meta bytes of the group's key
        rows, then in its value rows' after their own ``value_meta`` bytes."""
        in_keys = GROUP * key_meta_bytes
        tail = tl.maximum(key_meta_bytes - value_meta, 1)
        rest = tl.maximum(byte - in_keys, 0)
        in_k = byte < in_keys
        k_at = (first[:, None] + byte // key_meta_bytes) * stride + code_bytes + byte % key_meta_bytes
        v_at = (first[:, None] + rest // tail) * stride + code_bytes + value_meta + rest % tail
        from_k = tl.load(k_ptr + k_at, mask=mask & in_k, other=0)
        from_v = tl.load(v_ptr + v_at, mask=mask & (byte >= in_keys), other=0)
        return tl.where(in_k, from_k, from_v).to(tl.uint16)

    @triton.jit
    def _meta_half(k_ptr, v_ptr, first, byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP: tl.constexpr):
        """The float16 at ``byte`` of a key group's meta, as float32 (its two bytes may lie in two rows)."""
        lo = _meta_byte(k_ptr, v_ptr, first, byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP)
        hi = _meta_byte(k_ptr, v_ptr, first, byte + 1, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _slot_codes(base_ptr, row_at, h, slot, D, mask):
        """``[T, BLOCK_D]`` 2-bit codes of head ``h`` at slots ``slot`` ``[T, BLOCK_D]`` (kept inside the head)."""
        byte = tl.load(base_ptr + row_at[:, None] + (h * D + slot) // 4, mask=mask, other=0).to(tl.int32)
        return ((byte >> (2 * (slot % 4))) & 3).to(tl.float32)

    @triton.jit
    def _kivi_key(
        pages_ptr, v_ptr, r, h, d, H, D, stride, code_bytes, key_meta_bytes, value_meta, mask,
        GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """``[T, BLOCK_D]`` keys of rows ``r`` at channels ``d``: codes times their group's per-channel scale, plus
        its low (the group's [2, H, D] float16 meta lies over the meta bytes of its key rows, then of its value
        rows, ``_meta_half``). At 2 bits a channel's code lies in the slots its width gives (``kivi.slot_map``):
        the widths of every channel of the group (the signs of their scales) summed below ``d`` by one product
        with a triangular matrix. ``mask``: the rows read, over every channel ``< D``."""
        first = (r // GROUP) * GROUP
        scale_byte = h * D * 2 + 2 * d[None, :]
        low_byte = scale_byte + H * D * 2
        scale = _meta_half(pages_ptr, v_ptr, first, scale_byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP)
        low = _meta_half(pages_ptr, v_ptr, first, low_byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP)
        if BITS == 2:
            c = tl.arange(0, BLOCK_D)
            every_byte = h * D * 2 + 2 * c[None, :]
            every = _meta_half(pages_ptr, v_ptr, first, every_byte, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP)
            slots = tl.where(every == 0.0, 0.0, tl.where(every < 0.0, 2.0, 1.0))
            below = (c[:, None] < d[None, :]).to(tl.float32)
            lo = tl.minimum(tl.dot(slots, below, input_precision="ieee").to(tl.int32), D - 1)
            hi = tl.minimum(lo + 1, D - 1)
            size = tl.abs(scale)
            a = tl.where(scale == 0.0, 0.0, size)
            b = tl.where(scale < 0.0, 4.0 * size, 0.0)
            row_at = r * stride
            return _slot_codes(pages_ptr, row_at, h, lo, D, mask) * a + _slot_codes(pages_ptr, row_at, h, hi, D, mask) * b + low
        return _codes(pages_ptr, r * stride, h, d, D, mask, BITS) * scale + low

    @triton.jit
    def _paged_rows_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        index_ptr,
        pos_ptr,
        starts_ptr,
        lens_ptr,
        win_ptr,
        wk_ptr,
        wv_ptr,
        cos_ptr,
        sin_ptr,
        fk_ptr,
        fv_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        scale,
        H,
        G,
        D,
        stride,
        code_bytes,
        key_meta_bytes,
        value_group,
        value_meta,
        pairs,
        n_seq,
        SPLITS: tl.constexpr,
        BITS: tl.constexpr,
        ROW_SCALE: tl.constexpr,
        GROUP: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)  # this program's share of the rows: blocks sp, sp + SPLITS, ... (flash-decoding)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok, d_ok = g < G, d < D
        q_at = ((s * H + h) * G + g[:, None]) * D + d[None, :]
        q = tl.load(q_ptr + q_at, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        start = tl.load(starts_ptr + s)
        past = tl.load(lens_ptr + s) - 1  # the last read row is the decode's own new token, taken as computed
        m_i = tl.full((BLOCK_G,), -float("inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        t = tl.arange(0, BLOCK_T)
        for j in range(sp, tl.cdiv(past, BLOCK_T), SPLITS):
            tt = j * BLOCK_T + t
            ok = tt < past
            r = tl.load(index_ptr + start + tt, mask=ok, other=0).to(tl.int64)
            if BITS == 8:
                k = _int8_row(k_ptr, r * stride, h, d, H, D, ok, d_ok)
                v = _int8_row(v_ptr, r * stride, h, d, H, D, ok, d_ok)
            else:
                wk = tl.load(wk_ptr + start + tt, mask=ok, other=-1)
                wv = tl.load(wv_ptr + start + tt, mask=ok, other=-1)
                paged_k = ok & (wk < 0)
                mask = paged_k[:, None] & d_ok[None, :]
                k = _kivi_key(
                    k_ptr, v_ptr, r, h, d, H, D, stride, code_bytes, key_meta_bytes, value_meta, mask, GROUP, BITS, BLOCK_D
                )
                if ROPE:  # RopeFrame.turn: x * cos, plus the partner channel times the signed sin
                    partner = tl.where(d < pairs, d + pairs, tl.where(d < 2 * pairs, d - pairs, d))
                    k_partner = _kivi_key(
                        k_ptr, v_ptr, r, h, partner, H, D, stride, code_bytes, key_meta_bytes, value_meta, mask,
                        GROUP, BITS, BLOCK_D,
                    )  # fmt: skip
                    pos = tl.load(pos_ptr + start + tt, mask=ok, other=0).to(tl.int64)
                    angle_at = pos[:, None] * D + d[None, :]
                    c = tl.load(cos_ptr + angle_at, mask=mask, other=1.0)
                    sn = tl.load(sin_ptr + angle_at, mask=mask, other=0.0)
                    k = tl.where((d < 2 * pairs)[None, :], k * c + k_partner * sn, k)
                win_k = ok & (wk >= 0)
                k = tl.where(win_k[:, None], _int8_row(win_ptr, tl.maximum(wk, 0), h, d, H, D, win_k, d_ok), k)
                paged_v = (ok & (wv < 0))[:, None] & d_ok[None, :]
                v = _codes(v_ptr, r * stride, h, d, D, paged_v, BITS)
                if ROW_SCALE:  # one symmetric scale a row: code * scale - (2^bits - 1) / 2 * scale
                    row_scale = _half_at(v_ptr, r * stride + code_bytes, ok & (wv < 0))[:, None]
                    v = v * row_scale + row_scale * (-((1 << BITS) - 1) / 2)
                else:
                    groups = D // value_group
                    meta = r[:, None] * stride + code_bytes + (h * groups + d[None, :] // value_group) * 4
                    v = v * _half_at(v_ptr, meta, paged_v) + _half_at(v_ptr, meta + 2, paged_v)
                win_v = ok & (wv >= 0)
                v = tl.where(win_v[:, None], _int8_row(win_ptr, tl.maximum(wv, 0), h, d, H, D, win_v, d_ok), v)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_T]
            scores = tl.where(ok[None, :], scores, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        fresh_at = (s * H + h) * D + d
        fk = tl.load(fk_ptr + fresh_at, mask=d_ok, other=0.0).to(tl.float32)
        fv = tl.load(fv_ptr + fresh_at, mask=d_ok, other=0.0).to(tl.float32)
        own = tl.sum(q * fk[None, :], axis=1) * scale
        m_new = tl.maximum(m_i, own)  # every split shifts by a finite maximum, so an empty split merges as zeros
        alpha = tl.exp(m_i - m_new)
        p = tl.where(sp == 0, tl.exp(own - m_new), 0.0)  # the decode's own token counted once, by the first split
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * fv[None, :]
        if SPLITS == 1:
            tl.store(out_ptr + q_at, acc / l_i[:, None], mask=g_ok[:, None] & d_ok[None, :])
        else:  # this split's unnormalised state; merge_splits combines them
            tl.store(out_ptr + sp * n_seq * H * G * D + q_at, acc, mask=g_ok[:, None] & d_ok[None, :])
            state_at = sp * n_seq * H * G + (s * H + h) * G + g
            tl.store(m_ptr + state_at, m_new, mask=g_ok)
            tl.store(l_ptr + state_at, l_i, mask=g_ok)


# Flash-decoding: with one program per (decode, KV head) a batch of 16 decodes over a 7B's 8 KV heads is 128 programs
# walking 4096 rows each, on the H200's 132 SMs (3.8 ms for the int4 rows, 16x SDPA on the decoded rows). The rows
# are shared by up to this many programs per SM, each keeping at least _MIN_BLOCKS_PER_SPLIT row blocks on average;
# 0 turns it off.
DECODE_PROGRAMS_PER_SM = 4
_MIN_BLOCKS_PER_SPLIT = 4
_BLOCK_T = 16


def splits_for(decodes: int, heads: int, rows: int, device: torch.device) -> int:
    """How many programs share each (decode, KV head)'s rows, from shapes alone (no device sync): ``rows`` is the
    read index's length, all decodes' rows together."""
    if DECODE_PROGRAMS_PER_SM <= 0 or decodes == 0:
        return 1
    wanted = DECODE_PROGRAMS_PER_SM * multiprocessors(device) // (decodes * heads)
    blocks = rows // (decodes * _BLOCK_T)  # a decode's row blocks, on average
    return max(1, min(wanted, blocks // _MIN_BLOCKS_PER_SPLIT))


def merge_splits(acc: torch.Tensor, peak: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The softmax-weighted sum over splits' states: ``acc`` ``[P, S, H, G, D]``, each split's running maximum
    ``peak`` and its sum of exponentials ``mass`` ``[P, S, H, G]``."""
    top = peak.amax(dim=0)
    weight = torch.exp(peak - top)
    return (acc * weight[..., None]).sum(0) / (mass * weight).sum(0)[..., None]


def _launch(query, key_rows, value_rows, read_index, positions, starts, lengths, window, window_keys, window_values,
            cos, sin, fresh_keys, fresh_values, scale, bits, group, code_bytes, key_meta_bytes, value_group, pairs):  # fmt: skip
    if not HAVE_TRITON:  # pragma: no cover
        raise RuntimeError("hf_vram: Triton is not installed; the paged-row decode kernel needs it (pip install triton).")
    rows = (key_rows, value_rows)
    # rows of contiguous bytes, one row stride (an int4 layer's rows in int2 pages: wide rows, cut to the int4 row)
    byte_rows = all(x.dtype == torch.uint8 and x.dim() == 2 and x.stride(1) == 1 for x in rows)
    if not byte_rows or key_rows.stride(0) != value_rows.stride(0):
        raise ValueError(
            "hf_vram paged_rows_triton: key_rows and value_rows must be uint8 page rows with contiguous bytes and "
            "one row stride (the allocator's row views); got "
            f"{key_rows.dtype} {tuple(key_rows.shape)} stride {key_rows.stride()} and {value_rows.dtype} "
            f"{tuple(value_rows.shape)} stride {value_rows.stride()}."
        )
    device = query.device
    n, heads, group_q, dim = query.shape
    needed = heads * (dim + 2) if bits == 8 else code_bytes + key_meta_bytes  # the meta bytes hold a row's own meta
    # value_group 0: one symmetric scale a value row (2 bytes); else a (scale, low) per head and group of channels
    value_meta = 0 if bits == 8 else 2 if value_group == 0 else heads * (dim // value_group) * 4
    if min(key_rows.shape[1], value_rows.shape[1]) < needed:
        raise ValueError(
            f"hf_vram paged_rows_triton: a row must hold {needed} bytes (codes and scales of {heads} heads of {dim} at "
            f"{bits} bits); key_rows hold {key_rows.shape[1]}, value_rows {value_rows.shape[1]}."
        )
    out = torch.empty(query.shape, dtype=torch.float32, device=device)
    if n == 0:
        return out
    ints = [x.to(device=device, dtype=torch.int64).contiguous() for x in (read_index, positions, starts, lengths)]
    windows = [x.to(device=device, dtype=torch.int64).contiguous() for x in (window_keys, window_values)]
    # a 1-element stand-in where there is no rotary table (never read: ROPE is off), not a zero-size pointer
    tables = [(x if x.numel() else x.new_zeros(1)).to(device=device, dtype=torch.float32).contiguous() for x in (cos, sin)]
    fresh = [x.to(device).contiguous() for x in (fresh_keys, fresh_values)]
    splits = splits_for(n, heads, read_index.numel(), device)
    if splits > 1:
        acc = torch.empty((splits, *query.shape), dtype=torch.float32, device=device)
        peak, mass = (torch.empty((splits, n, heads, group_q), dtype=torch.float32, device=device) for _ in range(2))
    else:
        acc, peak, mass = out, out, out  # the state pointers are never written without splits
    _paged_rows_kernel[(n, heads, splits)](
        query.contiguous(), key_rows, value_rows, *ints, window.to(device), *windows, *tables, *fresh, acc, peak, mass,
        float(scale), heads, group_q, dim, key_rows.stride(0), code_bytes, key_meta_bytes, max(value_group, 1),
        value_meta, pairs, n, SPLITS=splits, BITS=bits, ROW_SCALE=bits != 8 and value_group == 0, GROUP=group,
        ROPE=bool(pairs) and bits != 8,
        BLOCK_G=triton.next_power_of_2(group_q), BLOCK_T=_BLOCK_T, BLOCK_D=triton.next_power_of_2(dim),
    )  # fmt: skip
    return out if splits == 1 else merge_splits(acc, peak, mass)


def paged_decode_int8_triton(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    read_index: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    fresh_keys: torch.Tensor,
    fresh_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``paged_decode_int8`` (int8 ``KVCodec`` rows) on the GPU: ``query`` ``[S, H, G, D]`` -> float32."""
    none = torch.full_like(read_index, -1)
    empty = torch.empty(0, device=query.device)
    return _launch(
        query, key_rows, value_rows, read_index, none, starts, lengths, key_rows.view(-1), none, none, empty, empty,
        fresh_keys, fresh_values, scale, 8, 1, 0, 0, 1, 0,
    )  # fmt: skip


def paged_decode_kivi_triton(
    query: torch.Tensor,
    key_rows: torch.Tensor,
    value_rows: torch.Tensor,
    read_index: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    window: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    fresh_keys: torch.Tensor,
    fresh_values: torch.Tensor,
    scale: float,
    bits: int,
    group: int,
    code_bytes: int,
    key_meta_bytes: int,
    value_group: int,
    rotary_pairs: int,
) -> torch.Tensor:
    """``paged_decode_kivi`` (4/2-bit KIVI rows and their int8 window) on the GPU: same arguments, float32."""
    if bits not in (4, 2):
        raise ValueError(f"hf_vram paged_decode_kivi_triton: bits={bits!r}; KIVI rows are 4 or 2 bits.")
    return _launch(
        query, key_rows, value_rows, read_index, positions, starts, lengths, window, window_keys, window_values, cos,
        sin, fresh_keys, fresh_values, scale, bits, group, code_bytes, key_meta_bytes, value_group, rotary_pairs,
    )  # fmt: skip
