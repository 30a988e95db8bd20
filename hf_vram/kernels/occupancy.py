"""How many programs a GPU runs at once, for kernels that split their work until it is busy.

The decode kernels (``triton_matmul``'s split-K, ``triton_paged_rows``' flash-decoding) size their grids from the
device's multiprocessor count. The CPU interpreter (``TRITON_INTERPRET=1``) has none: it gets a small pretend count,
so the tests walk the same split paths a GPU takes.
"""

from __future__ import annotations

import functools

import torch

INTERPRETER_MULTIPROCESSORS = 4


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors (132 on an H200); the interpreter's pretend count elsewhere."""
    if device.type == "cuda":
        return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_MULTIPROCESSORS
