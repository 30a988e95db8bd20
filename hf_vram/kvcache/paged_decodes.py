"""A continuous-batching step's one-token sequences, handed from the quantized pages straight to the attention.

The index path of Transformers' paged cache has the allocator return every key and value the step reads, and the
attention then slices them per sequence. For quantized pages that means dequantizing each decode's whole history into a
float copy, every layer, every step, before an attention call that reads it once more. Instead, when the model
attends with ``hf_vram_varlen`` and a kernel reads the pages on their device, the allocator leaves the decodes' rows unread
(their slots in the returned K/V stay unfilled) and puts a ``PagedDecodes`` under ``PAGED_DECODES`` in the layer's
attention kwargs (the cache's ``update`` fills those kwargs in place, Transformers' own seam); the attention runs
the kernel over the pages for them (``hf_vram.kernels.paged_decode`` on the CPU, its Triton twin
``hf_vram.kernels.triton_paged_rows`` on CUDA: ``decode_kernel``) and attends as before for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from hf_vram.kernels import paged_decode, triton_paged_rows
from hf_vram.kernels.paged_decode import paged_decode_int8, paged_decode_kivi
from hf_vram.kernels.triton_paged_rows import paged_decode_int8_triton, paged_decode_kivi_triton

PAGED_DECODES = "hf_vram_paged_decodes"


class DecodePlan(NamedTuple):
    """Which of a step's sequences are decodes (one new token), found once a step from ``cu_seq_lens``."""

    query_rows: torch.Tensor  # [S] int64: each decode's row among the step's new tokens
    starts: torch.Tensor  # [S] int64: where its keys begin in the read index
    lengths: torch.Tensor  # [S] int64: its keys, its own new token last
    read_index: torch.Tensor  # the step's read index, int64
    other_positions: torch.Tensor  # positions in the read index of every other sequence's keys (read as before)
    other_reads: torch.Tensor  # the rows there: read_index[other_positions]
    query_row_set: frozenset[int]  # query_rows, for the attention's per-sequence loop


class KiviReads(NamedTuple):
    """What int4/int2 pages add for one layer: where each read row sits in its sequence (its rotary angle), which
    rows the request's window answers for (byte offsets of their int8 rows, -1: the pages), the rotary tables and
    the rows' layout (bits, key group, code bytes, key meta bytes, value group)."""

    positions: torch.Tensor
    window: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rotary_pairs: int
    layout: tuple[int, int, int, int, int]


class PagedDecodes(NamedTuple):
    """What the attention needs to run the decodes of one layer from its pages."""

    plan: DecodePlan
    key_rows: torch.Tensor  # the layer's uint8 rows, addressed by physical index
    value_rows: torch.Tensor
    fresh_keys: torch.Tensor  # [S, kv_heads, head_dim]: each decode's own new token as computed
    fresh_values: torch.Tensor
    kivi: KiviReads | None = None  # int4/int2 pages; None: int8 rows


def decode_kernel(device: torch.device) -> str | None:
    """Which kernel attends a step's decodes straight from the pages on ``device``: ``"cpu"``, hf_vram's CPU kernel
    where it is loaded; ``"triton"`` on CUDA where Triton is installed; None: the allocator reads the rows into
    K/V (torch ops) and the attention runs as for any other sequence."""
    if device.type == "cpu":
        return "cpu" if paged_decode.kernel_available() else None
    if device.type == "cuda" and triton_paged_rows.HAVE_TRITON:
        return "triton"
    return None


def decode_plan(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, read_index: torch.Tensor) -> DecodePlan | None:
    """The plan, or None when the step has no decode (or reads nothing: a batch of prefills)."""
    if read_index.numel() == 0:
        return None
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    decodes, others = [], []
    for s in range(len(q_bounds) - 1):
        if q_bounds[s + 1] - q_bounds[s] == 1 and k_bounds[s + 1] > k_bounds[s]:
            decodes.append((q_bounds[s], k_bounds[s], k_bounds[s + 1] - k_bounds[s]))
        elif k_bounds[s + 1] > k_bounds[s]:
            others.append(torch.arange(k_bounds[s], k_bounds[s + 1]))
    if not decodes:
        return None
    device = read_index.device  # where the step's tensors are (the pages' device), for every index op on them
    rows, starts, lengths = (torch.tensor(c, dtype=torch.long, device=device) for c in zip(*decodes, strict=True))
    other = torch.cat(others).to(device) if others else torch.empty(0, dtype=torch.long, device=device)
    index = read_index.long()
    return DecodePlan(rows, starts, lengths, index, other, index[other], frozenset(r for r, _, _ in decodes))


def read_others(
    plan: DecodePlan, states: tuple[torch.Tensor, torch.Tensor], read: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's K/V reads, shaped like ``states``' rows, with the decodes' slots left unfilled and the other
    sequences' rows read by ``read`` (the allocator's own read of those page rows)."""
    out = [x.new_empty((plan.read_index.numel(), *x.shape[1:])) for x in states]
    if plan.other_positions.numel():
        for into, got in zip(out, read(plan.other_reads), strict=True):
            into.index_copy_(0, plan.other_positions, got)
    return out[0], out[1]


def fresh_states(plan: DecodePlan, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode's own new token as computed (``[S, kv_heads, head_dim]`` keys and values)."""
    return key_states.index_select(0, plan.query_rows), value_states.index_select(0, plan.query_rows)


def attend_paged_decodes(query: torch.Tensor, out: torch.Tensor, decodes: PagedDecodes, scale: float) -> None:
    """Write into ``out`` (``[1, heads, Q, d]``) the attention of the plan's decodes, run from the quantized pages
    (int8 rows, or int4/int2 rows and their windows); a KV head's query heads are the rows of one task."""
    plan = decodes.plan
    kv_heads, head_dim = decodes.fresh_keys.shape[1:]
    heads, n = query.shape[1], plan.query_rows.numel()
    q = query[0].index_select(1, plan.query_rows).transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, head_dim)
    fresh = (decodes.fresh_keys, decodes.fresh_values)
    on_gpu = decode_kernel(query.device) == "triton"
    if decodes.kivi is None:
        int8 = paged_decode_int8_triton if on_gpu else paged_decode_int8
        o = int8(q, decodes.key_rows, decodes.value_rows, plan.read_index, plan.starts, plan.lengths, *fresh, scale)
    else:
        k = decodes.kivi
        o = (paged_decode_kivi_triton if on_gpu else paged_decode_kivi)(
            q, decodes.key_rows, decodes.value_rows, plan.read_index, k.positions, plan.starts, plan.lengths,
            k.window, k.window_keys, k.window_values, k.cos, k.sin, *fresh, scale, *k.layout, k.rotary_pairs,
        )  # fmt: skip
    out[0].index_copy_(1, plan.query_rows, o.reshape(n, heads, head_dim).transpose(0, 1).to(out.dtype))
