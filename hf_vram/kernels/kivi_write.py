"""Whole 4-/2-bit KIVI groups quantized from their int8 rows by hf_vram's CPU kernel (``csrc/kivi_write.cpp``): the
seal of the int4/int2 pages (``hf_vram.kvcache.windowed_allocator``), when a group fills in the window or a prefill
writes it whole. torch's path (``WindowedKVCodec.encode_keys`` / ``encode_values`` after the window's read) runs
some forty small ops per layer for a step's group or two; a timing of ``benchmarks/batching.py``'s int4 row (32
requests, wrapped functions) put the seal at 7% of the run."""

from __future__ import annotations

from typing import Protocol

import torch

from hf_vram.kernels import cpu_extension

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KiviLayout(Protocol):
    """The row layout the sealer writes (``hf_vram.kvcache.kivi.WindowedKVCodec`` has it; kernels sit below the K/V
    cache, so they name the attributes, not the class)."""

    num_heads: int
    head_dim: int
    bits: int
    group: int
    value_group: int
    clip_keys: bool
    code_bytes: int
    key_meta_bytes: int
    row_bytes: int


def kernel_available() -> bool:
    """Whether hf_vram's CPU kernels are loaded (one seam, so a test can turn the sealer alone off)."""
    return cpu_extension.load()


def takes(states: torch.Tensor, window_dtype: torch.dtype) -> bool:
    """Whether these states' groups are sealed by the kernel: CPU tensors, states and window in float dtypes it
    rounds like, where it is loaded (CUDA's take torch's ops)."""
    return states.device.type == "cpu" and states.dtype in DTYPE_CODES and window_dtype in DTYPE_CODES and kernel_available()


def encode_from_int8(
    codec: KiviLayout,
    bytes_: torch.Tensor,
    key_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key rows and value rows ``[n * group, row_bytes]`` of whole groups whose int8 rows (``KVCodec``) lie at
    byte ``key_offsets`` / ``value_offsets`` of the flat ``bytes_`` (each group's rows in order), read as the model's
    ``dtype`` holds them, keys turned back by ``tables`` (``WindowedKVCodec.seal_tables``): the rows
    ``codec.encode_keys`` / ``encode_values`` write from that read, up to a code at an exact rounding tie. Kernel
    only: callers ask ``takes`` first."""
    if not kernel_available():
        raise RuntimeError("hf_vram: kivi encode needs hf_vram's CPU kernels, which are not loaded (see the warning).")
    return torch.ops.hf_vram_cpu.kivi_encode_from_int8(
        bytes_, key_offsets.long().contiguous(), value_offsets.long().contiguous(), *tables[:2],
        codec.num_heads, codec.head_dim, codec.bits, codec.group, codec.value_group, tables[2],
        codec.clip_keys, codec.code_bytes, codec.key_meta_bytes, codec.row_bytes, DTYPE_CODES[dtype],
    )  # fmt: skip
