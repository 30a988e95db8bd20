"""Keep a long-running server's memory steady while its batches change shape.

Continuous batching gives nearly every step a new number of tokens, so every step can be a new shape for the CPU
kernels. Measured with ``benchmarks/serve_soak.py`` (8 streaming clients, SmolLM2 int8 weights and K/V, 2-core
Xeon; BENCHMARKS.md): over 10 minutes the server's RSS grew 85 MiB per 100 answers as Transformers and torch leave
it (band -15.6% / +14.0% after the warm-up), 44 with both settings below (-5.6% / +5.6%); ``transformers serve``
alone grew 113 per 100 answers over 4 minutes. Four-minute trials sorted the causes: oneDNN's primitive cache (a
compiled kernel per shape, 1024 kept by default) held to 16 halved the growth; glibc's mmap threshold fixed at
128 KiB as well (freed activations go back to the system instead of staying in the heap) narrowed the band to
-3.4% / +2.9%; ``MALLOC_ARENA_MAX=2`` and ``malloc_trim`` every 5 s changed nothing. The rest of the creep was
live memory in large blocks (glibc's ``mallinfo2``: its mmapped bytes in use grew 46 MiB over 200 answers in a
continuous-batching loop in one process, ``malloc_trim`` freed nothing, Python's own allocations grew by KiB):
ideep's cache of computation primitives (torch's bfloat16 matmuls on oneDNN, ``LRU_CACHE_CAPACITY``, 1024 by
default), a second per-shape cache beside oneDNN's. Held to 16 as well, the mmapped bytes stayed flat and the loop's
RSS grew 15 MiB per 100 answers instead of 40, and the 10-minute soak's band narrowed to -4.8% / +4.4%. (400
bfloat16 linears of distinct row counts: RSS +295 MiB as torch leaves it, +203 with oneDNN's cache held, +261 with
ideep's alone, +36 with both.)

The mmap threshold was first fixed at 128 KiB. That made every step's larger buffers (a layer's dequantized K/V,
a prefill chunk's MLP activations: 0.5-3 MiB each) fresh mappings, page faults and all: the ``hf-vram serve, bf16
weights + int8 KV`` row of ``benchmarks/serve_load.py`` ran 65.9 tokens/s with it and 98.6 at 32 MiB (reproduce the
old one with ``MALLOC_MMAP_THRESHOLD_=131072``, which this function leaves alone). It is now fixed at glibc's
largest value, 32 MiB, which is where glibc's own sliding threshold ends up; fixing it still stops the slide (and
the trim threshold that follows it), so what a step frees is reused by the next one instead of changing the heap's
shape as the threshold moves.

All three are applied when ``hf-vram serve`` starts, unless the user set them: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
and ``LRU_CACHE_CAPACITY`` (each read when its cache is first used, i.e. after this) and ``MALLOC_MMAP_THRESHOLD_``
(applied now with ``mallopt``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import MutableMapping

ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE = "LRU_CACHE_CAPACITY"
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
ONEDNN_KERNELS = 16
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def steady_memory(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Apply what the module docstring describes; returns the settings applied (none the user had set)."""
    applied = []
    for cache in (ONEDNN_CACHE, IDEEP_CACHE):
        if cache not in environ:
            environ[cache] = str(ONEDNN_KERNELS)
            applied.append(f"{cache}={ONEDNN_KERNELS}")
    if MMAP_THRESHOLD not in environ:
        name = ctypes.util.find_library("c")
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
        if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1:  # glibc: 1 on success
            applied.append(f"mallopt(M_MMAP_THRESHOLD, {MMAP_THRESHOLD_BYTES})")
    return applied
