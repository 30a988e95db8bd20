"""int8 K/V rows written at byte offsets by hf_vram's CPU kernel (``csrc/kv_write.cpp``): the write side of the int8
pages and of the int4/int2 pages' window. The same bytes as ``KVCodec.encode`` (tested bit for bit) in one pass:
torch's path runs eight small ops for a step's few decoding tokens, per layer and per K and V (a py-spy profile of
``benchmarks/batching.py``'s int4 row, 32 requests, put those window writes at 8% of the step; with the kernel and
the window's offsets found once a step the row went from 60 to 69-72 tokens/s in that setting; the committed table
is BENCHMARKS.md's batching run)."""

from __future__ import annotations

import torch

from hf_vram.kernels import cpu_extension


def kernel_available() -> bool:
    return cpu_extension.load()


def takes(states: torch.Tensor) -> bool:
    """Whether these states are written by the kernel: CPU tensors, where it is loaded (CUDA's take torch's ops)."""
    return states.device.type == "cpu" and kernel_available()


def quantize_rows_int8(states: torch.Tensor, bytes_: torch.Tensor, offsets: torch.Tensor) -> None:
    """Write ``states [n, H, D]`` as ``KVCodec`` int8 rows (``H * D`` codes, then ``H`` float16 scales) at byte
    ``offsets [n]`` of the flat uint8 ``bytes_``. Kernel only: callers ask ``takes`` first."""
    if not kernel_available():
        raise RuntimeError("hf_vram: quantize_rows_int8 needs hf_vram's CPU kernels, which are not loaded (see the warning).")
    torch.ops.hf_vram_cpu.quantize_rows_int8(states.contiguous(), bytes_, offsets.long().contiguous())
