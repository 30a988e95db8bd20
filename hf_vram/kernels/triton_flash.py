"""Flash-style attention forward for CUDA: online softmax over key blocks, O(n) memory, GQA without expansion.

Each program owns ``BLOCK_M`` query rows of one (batch, query head); it walks the key blocks of KV head
``h // group`` (up to the causal limit), keeping a running max and sum in float32, so no ``q x k`` score matrix ever
exists in memory. Masks: causal (queries aligned to the end of the keys, as with a KV cache), and key padding from a
``[batch, kv]`` validity vector. Query rows that see no key return zeros. ``flash_reference`` is the torch definition;
the kernel is tested against it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.preconditions import rows_contiguous

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def flash_reference(q, k, v, scale: float, causal: bool, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` [B, Hq, Q, D], ``k``/``v`` [B, Hkv, K, D], ``key_valid`` [B, K] bool -> [B, Hq, Q, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).float()
    v = v.repeat_interleave(group, 1).float()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    q_len, k_len = q.shape[2], k.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(k_len, device=q.device)[None, :] <= torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(q.dtype)


if HAVE_TRITON:

    @triton.jit
    def _flash_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        valid_ptr,
        o_ptr,
        scale,
        HQ,
        HKV,
        Q,
        K,
        D,
        sqb,
        sqh,
        sqq,
        skb,
        skh,
        skk,
        svb,
        svh,
        svk,
        sob,
        soh,
        soq,
        GROUP: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_VALID: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // HQ
        h = bh % HQ
        kvh = h // GROUP
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + b * sqb + h * sqh + rm[:, None] * sqq + rd[None, :], mask=(rm[:, None] < Q) & (rd[None, :] < D), other=0.0
        ).to(tl.float32)
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        shift = K - Q
        stop = K
        if CAUSAL:
            stop = tl.minimum(K, (tl.program_id(1) + 1) * BLOCK_M + shift)
        for n0 in range(0, stop, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            kv_ok = rn < K
            k = tl.load(
                k_ptr + b * skb + kvh * skh + rn[:, None] * skk + rd[None, :], mask=kv_ok[:, None] & (rd[None, :] < D), other=0.0
            ).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            allowed = kv_ok[None, :] & (rm[:, None] < Q)
            if CAUSAL:
                allowed = allowed & (rn[None, :] <= rm[:, None] + shift)
            if HAS_VALID:
                allowed = allowed & (tl.load(valid_ptr + b * K + rn, mask=kv_ok, other=0) != 0)[None, :]
            s = tl.where(allowed, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_ptr + b * svb + kvh * svh + rn[:, None] * svk + rd[None, :], mask=kv_ok[:, None] & (rd[None, :] < D), other=0.0
            ).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            o_ptr + b * sob + h * soh + rm[:, None] * soq + rd[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=(rm[:, None] < Q) & (rd[None, :] < D),
        )


def flash_attention_triton(q, k, v, scale: float, causal: bool, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel; same arguments and result as ``flash_reference``."""
    if not HAVE_TRITON:  # pragma: no cover
        raise RuntimeError("hf_vram: Triton is not installed; the flash attention kernel needs it.")
    if q.dim() != 4 or k.shape != v.shape or q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"hf_vram kernel flash_attention_triton: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected [batch, heads, tokens, dim] with query heads a multiple of KV heads"
        )
    q = rows_contiguous(q)  # the kernel takes q's strides but reads each row's dims contiguously
    batch, hq, q_len, dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k, v = k.contiguous(), v.contiguous()
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else q.new_empty(1, dtype=torch.int8)
    block_m = 16 if q_len <= 16 else 64
    grid = (batch * hq, triton.cdiv(q_len, block_m))
    _flash_kernel[grid](
        q,
        k,
        v,
        valid,
        out,
        scale,
        hq,
        hkv,
        q_len,
        k_len,
        dim,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        GROUP=hq // hkv,
        CAUSAL=causal,
        HAS_VALID=key_valid is not None,
        BLOCK_M=block_m,
        BLOCK_N=32,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return out
