"""Values of int4/int2 pages stored turned by a Hadamard matrix, and the attention's output turned back.

A value row is quantized per token over its channels (``kivi``): a few large channels set the range of every token's
row, and the rest round coarsely. A normalized Hadamard matrix ``H`` (orthonormal and symmetric: ``H @ H = I``)
spreads each channel over all of them, so a row's range follows its norm instead of its largest channel (QuaRot,
arXiv 2404.00456, turns K/V the same way). Attention is linear in the values, so nothing else needs to know:
``softmax(QK^T) (V H) H = softmax(QK^T) V``. The cache turns a step's new values before it writes them (the int8
window and the pages both hold turned values), and ``hf_vram_varlen`` turns its output back once per query row (one
``[head_dim, head_dim]`` product per head, whatever the context length), so every reader of the pages (torch's,
hf_vram's CPU kernel, Triton) stays as it is. Keys are not turned: their outlier channels are stable across a key
group's tokens, which the per-channel scales already absorb, and turning them mixes those channels into all the others
(measured below).

Measured on SmolLM2 (``benchmarks/long_context.py``: bfloat16, two 8192-token pydoc windows, every token's attention
reading the past as the pages return it at its decode step; 40 passkey prompts of 1k-8k tokens), unturned -> turned:
int4 perplexity +1.56% -> +0.94% against bfloat16 K/V, passkeys 22 -> 24 (bfloat16 26); with a 64-token sink and
recent window +0.73% -> +0.66%, 25 either way. Over four 2048-token windows (``benchmarks/batching.py``'s K/V
quality) it was no better (int4 +0.72% -> +0.75%), and float32 greedy tokens equal to float32 K/V's before the first
difference fell (350 -> 273 of 512; tokens/s about the same, 71.3 against 69.5 in one 64-request run), so
``kv_cache.rotate_values`` turned it on, for long contexts. Since 2026-12-05 int4 always turns values: turned values
are what lets its value rows keep one symmetric scale for all heads (``kivi.WindowedKVCodec``'s ``row_scale``: +0.48%
instead of +0.72% over those four windows, +0.76% instead of +0.94% at 8k, and 2 bytes of meta instead of 12, room
for part of the key meta; unturned values with one scale: +1.80%). At int2 it stays ``kv_cache.rotate_values``'
choice. A prototype over
two 2048-token windows turned keys too: int2 +5.42% -> +5.08%, but int4 +0.42% -> +1.20%, and a key turned before
its rotary embedding would cost every read a ``[head_dim, head_dim]`` product per key, not per query.
"""

from __future__ import annotations

import functools

import torch

from hf_vram.kernels.cpu_caps import native_half_matmul

VALUE_ROTATION = "hf_vram_value_rotation"  # the attention kwarg under which the cache hands over the matrix


@functools.cache
def _hadamard(size: int) -> torch.Tensor:
    """Sylvester's normalized Hadamard matrix of a power-of-two ``size`` (float64: exact, rounded once on use)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def value_rotation(head_dim: int) -> torch.Tensor | None:
    """``[head_dim, head_dim]`` float32, orthonormal and symmetric: block-diagonal Hadamard blocks of the largest
    power of two dividing ``head_dim`` (the whole head for 64 or 128; blocks of 16 for 80), or None when that is 1
    (an odd head size: nothing to spread)."""
    block = head_dim & -head_dim
    if block < 2:
        return None
    return torch.block_diag(*[_hadamard(block)] * (head_dim // block)).float()


def rotate(states: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``states @ matrix`` over the last (head) dimension, returned in ``states``' dtype: the same call turns values
    and turns an attention output back (the matrix is its own inverse). Products are summed in float32 and rounded
    once to ``states``' dtype either way: as one product in that dtype where the matrix's entries are exact in it
    (bfloat16 / float16 matmuls accumulate in float32; the normalized Hadamard entries of a block of 4, 16, 64 or 256
    channels are +-2^-k) and the device multiplies it natively (``cpu_caps.native_half_matmul``: a bfloat16 matmul
    on the AVX2 EPYC is 4.5-8x slower than float32), which on the AVX-512 EPYC took 50 us instead of 800 us for a
    512-token prefill step's output of SmolLM2 (4608 rows of 64), the same values; else as one float32 product."""
    matrix = matrix.to(states.device)
    flat = states.reshape(-1, states.shape[-1])
    native = states.device.type != "cpu" or native_half_matmul(states.dtype)
    if states.dtype in _HALF_DTYPES and native and _exact_in_half(matrix.shape[-1] & -matrix.shape[-1]):
        return torch.nn.functional.linear(flat, matrix.to(states.dtype)).reshape(states.shape)  # symmetric: H^T = H
    return (flat.float() @ matrix).to(states.dtype).reshape(states.shape)


_HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _exact_in_half(block: int) -> bool:
    """Whether ``1 / sqrt(block)`` (a Hadamard block's entries) is a power of two: ``block`` a power of 4."""
    return block.bit_length() % 2 == 1 and block & (block - 1) == 0
