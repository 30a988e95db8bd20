"""Fused residual add + RMSNorm for CUDA: one read of x and the residual, one write of the sum and the norm.

Each program handles one row: it loads ``x`` (and the residual), adds them in float32, writes the sum, computes
the mean square, and writes ``norm * weight`` (Llama: cast to the input dtype before the weight multiply) or
``norm * (1 + weight)`` (Gemma: in float32, cast last). ``add_rms_norm_reference`` is the torch definition; the kernel
is tested against it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def add_rms_norm_reference(x, residual, weight, eps: float, gemma: bool = False):
    total = x if residual is None else x + residual
    h = total.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return total, (normed * (1.0 + weight.float())).type_as(total)
    return total, weight * normed.to(total.dtype)


if HAVE_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        sum_ptr,
        out_ptr,
        N,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        GEMMA: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * N + cols, x, mask=ok)
        h = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        if GEMMA:
            y = h * inv * (1.0 + w.to(tl.float32))
        else:
            y = (h * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    def add_rms_norm_triton(x, residual, weight, eps: float, gemma: bool = False):
        shape, n = x.shape, x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        res = residual.reshape(-1, n).contiguous() if residual is not None else flat
        total = torch.empty_like(flat) if residual is not None else flat
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
        _add_rms_norm_kernel[(flat.shape[0],)](
            flat,
            res,
            weight.contiguous(),
            total,
            out,
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            GEMMA=gemma,
            BLOCK=triton.next_power_of_2(n),
        )
        return total.view(shape), out.view(shape)

else:  # pragma: no cover
    add_rms_norm_triton = None
