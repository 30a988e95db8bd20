"""Which CPU kernel path this process takes, and which other paths this machine can be made to take.

torch picks one implementation of its CPU kernels per process, by capability: ``DEFAULT`` (plain vector code),
``AVX2`` or ``AVX512``. It chooses the best the CPU supports unless ``ATEN_CPU_CAPABILITY`` names a lower one, read
once at start. The project's machines are AMD EPYC (AVX2, no AVX-512; or AVX-512 with AVX512-BF16 and VNNI, no
AMX) or Intel Xeon (AVX-512, AVX512-BF16, AMX), and the same torch call can behave differently on each path:
``torch._weight_int8pack_mm`` with bfloat16 activations segfaults on the AVX-512 path when its weight is not 16-byte
aligned, and runs on the AVX2 one. So the tests run each reachable path in a subprocess, and the benchmarks label
their tables with :func:`cpu_description` and keep them per :func:`cpu_family`.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# ATEN_CPU_CAPABILITY values, lowest first, with the CPU flags each one executes.
CAPABILITY_FLAGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}
# Flags that change which kernels are fast (bf16/int8 dot products and matrix units), shown in benchmark labels.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# oneDNN runs bfloat16 / float16 matmuls natively (bf16 dot products, AMX tiles, or AVX-512 conversions) only with
# one of these; without them torch falls back to a generic kernel: on the AMD EPYC (AVX2) a bfloat16 F.linear of
# 64-1024 rows is 4.5-8x slower than float32 (benchmarks/kernel_speed.py's crossover, its int8 dequant + bf16 column).
NATIVE_HALF_MATMUL_FLAGS = {
    torch.bfloat16: ("avx512bw", "avx512_bf16", "amx_bf16", "avx_ne_convert"),
    torch.float16: ("avx512_fp16", "amx_fp16", "avx_ne_convert"),
}


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16, float16) matrices natively; True for float32 and for
    non-x86 CPUs (nothing known against them). Read from the CPU's flags: oneDNN picks its kernels by the CPU, not
    by ``ATEN_CPU_CAPABILITY``."""
    needed = NATIVE_HALF_MATMUL_FLAGS.get(dtype)
    flags = cpu_flags()
    if needed is None or not flags or platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return any(f in flags for f in needed)


def torch_capability() -> str:
    """The path this process's torch dispatches to: ``default``, ``avx2`` or ``avx512`` (lower case)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def reachable_capabilities() -> tuple[str, ...]:
    """The ``ATEN_CPU_CAPABILITY`` values this CPU can run (asking for more than it has kills the process: SIGILL)."""
    flags = cpu_flags()
    return tuple(cap for cap, needed in CAPABILITY_FLAGS.items() if all(f in flags for f in needed))


def cpu_family() -> str:
    """A short name of the CPU family for result files: ``avx512-amx``, ``avx512``, ``avx2`` or ``default``."""
    flags = cpu_flags()
    best = reachable_capabilities()[-1] if flags else torch_capability()
    return f"{best}-amx" if best == "avx512" and "amx_int8" in flags else best


def cpu_description() -> str:
    """E.g. ``AMD EPYC (avx2 fma; no AVX-512), torch path AVX2``: what a benchmark table must say it ran on."""
    flags = cpu_flags()
    shown = " ".join(f for f in SPEED_FLAGS if f in flags) or "flags unknown"
    if flags and "avx512f" not in flags:
        shown += "; no AVX-512"
    return f"{cpu_model()} ({shown}), torch path {torch_capability().upper()}"
