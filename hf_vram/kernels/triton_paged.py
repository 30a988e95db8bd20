"""Paged decode attention for CUDA: one query token per sequence attends to its keys where they lie in the pool.

The keys and values are never gathered: each program (one sequence, one query head) walks its block table, loads
``BLOCK_SIZE`` slots of its KV head at a time (int8 codes are scaled in registers), and keeps an online softmax
(running max and sum) in float32, so memory traffic is the cache itself and nothing is materialised per step.
Grouped-query attention reads the KV head ``h // group`` without expanding it. ``paged_decode_reference`` is the
plain-torch definition; the kernel is tested against it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.preconditions import require_contiguous

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def paged_decode_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q`` [B, Hq, D]; ``keys``/``values`` [Hkv, slots, D] (int8 with ``*_scales`` [Hkv, slots]); -> [B, Hq, D]."""
    batch, hq, _ = q.shape
    group = hq // keys.shape[0]
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(seq_lens[b])
        positions = torch.arange(n, device=q.device)
        slots = block_tables[b, positions // block_size].long() * block_size + positions % block_size
        k, v = keys[:, slots].float(), values[:, slots].float()
        if key_scales is not None:
            k = k * key_scales[:, slots].float()[..., None]
            v = v * value_scales[:, slots].float()[..., None]
        k = k.repeat_interleave(group, dim=0)  # [Hq, n, D]
        v = v.repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


if HAVE_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        ks_ptr,
        vs_ptr,
        table_ptr,
        lens_ptr,
        out_ptr,
        scale,
        max_blocks,
        HQ,
        SLOTS,
        D,
        GROUP: tl.constexpr,
        QUANT: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kv = h // GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + (b * HQ + h) * D + d, mask=d_ok, other=0.0).to(tl.float32)
        n = tl.load(lens_ptr + b)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        t = tl.arange(0, BLOCK_SIZE)
        for j in range(0, tl.cdiv(n, BLOCK_SIZE)):
            block = tl.load(table_ptr + b * max_blocks + j).to(tl.int64)
            slot = block * BLOCK_SIZE + t
            ok = j * BLOCK_SIZE + t < n
            offs = (kv * SLOTS + slot[:, None]) * D + d[None, :]
            k = tl.load(k_ptr + offs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            if QUANT:
                k = k * tl.load(ks_ptr + kv * SLOTS + slot, mask=ok, other=0.0)[:, None]
                v = v * tl.load(vs_ptr + kv * SLOTS + slot, mask=ok, other=0.0)[:, None]
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(ok, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        tl.store(out_ptr + (b * HQ + h) * D + d, acc / l_i, mask=d_ok)


def paged_decode_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel; same arguments and result as ``paged_decode_reference`` (output in float32 math)."""
    if not HAVE_TRITON:  # pragma: no cover
        raise RuntimeError("hf_vram: Triton is not installed; the paged decode kernel needs it (pip install triton).")
    for name, t in (("keys", keys), ("values", values), ("key_scales", key_scales), ("value_scales", value_scales)):
        if t is not None:
            require_contiguous(t, name, "paged_decode_triton")
    batch, hq, dim = q.shape
    hkv, slots = keys.shape[0], keys.shape[1]
    q = q.contiguous()
    out = torch.empty(batch, hq, dim, dtype=torch.float32, device=q.device)
    quant = key_scales is not None
    dummy = keys.new_empty(1, dtype=torch.float32)
    _paged_decode_kernel[(batch, hq)](
        q,
        keys,
        values,
        key_scales if quant else dummy,
        value_scales if quant else dummy,
        block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        out,
        scale,
        block_tables.shape[1],
        hq,
        slots,
        dim,
        GROUP=hq // hkv,
        QUANT=quant,
        BLOCK_SIZE=block_size,
        BLOCK_D=triton.next_power_of_2(dim),
    )
    return out.to(q.dtype)
