"""hf_vram's own CPU kernels (``csrc/``), compiled for this machine on first use and cached.

torch has no op that attends from quantized K/V rows by index: its path gathers the rows a step reads,
dequantizes them into a float copy, pads the decodes' keys into shared batches and runs a float attention over
them, several passes over memory for every cached element where the rows themselves are read once. So
``csrc/paged_decode.cpp`` does that one job (decode attention over int8 rows, and over int4/int2 KIVI rows with
their windows). And torch's packed int8 matmul walks the weight once per row of x, so a step of many decodes costs
as many matrix-vector products: ``csrc/int8_matmul.cpp`` multiplies each widened weight tile into all the rows
(``hf_vram.kernels.int8_weight_matmul``); ``csrc/kv_write.cpp`` writes int8 K/V rows in one pass
(``hf_vram.kernels.kv_write``) and ``csrc/kivi_write.cpp`` quantizes whole int4/int2 groups from them
(``hf_vram.kernels.kivi_write``). All are built with ``torch.utils.cpp_extension`` (gcc and ninja; ~30 s once per machine, then loaded from
torch's extension cache) for the instruction set of torch's CPU path: x86-64-v3 (AVX2, FMA, F16C) where torch takes
its AVX2 path, x86-64-v4 (AVX-512) where it takes its AVX-512 one, plain x86-64 on its default path:
``ATEN_CPU_CAPABILITY`` moves both together, which is how the tests run each build on one machine.
``HF_VRAM_CPU_ISA`` names another ``-march``; ``HF_VRAM_CPU_KERNELS=0`` turns the kernels off. Where the build
cannot run (no compiler), ``load`` says why once and returns False, and the callers take torch's path: slower, the
same numbers up to float rounding. No headers of our own: torch's builder rebuilds when a source changes, not a header.
Measured by ``benchmarks/paged_decode.py`` and ``benchmarks/kernel_speed.py`` (BENCHMARKS.md).

``python -m hf_vram.kernels.cpu_extension`` builds it ahead (``make setup`` does).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

from hf_vram.kernels.cpu_caps import torch_capability

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("paged_decode.cpp", "int8_matmul.cpp", "kv_write.cpp", "kivi_write.cpp")
)
OPS = (
    "paged_decode_int8",
    "paged_decode_kivi",
    "int8_weight_matmul",
    "int8_weight_matmul_bf16_dot",
    "quantize_rows_int8",
    "kivi_encode_from_int8",
)
# torch's CPU path -> the -march its build of these kernels takes: AVX2 + FMA + F16C, AVX-512, or plain x86-64
# (the kernels' portable loops)
ISA_BY_CAPABILITY = {"default": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}


def target_isa() -> str | None:
    """The ``-march`` this process builds for: ``HF_VRAM_CPU_ISA``, else that of torch's own CPU path (so
    ``ATEN_CPU_CAPABILITY=avx2`` runs the AVX2 build of these kernels too); None off x86."""
    if os.environ.get("HF_VRAM_CPU_ISA"):
        return os.environ["HF_VRAM_CPU_ISA"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return ISA_BY_CAPABILITY.get(torch_capability(), "x86-64")


def compiler_present() -> bool:
    """Whether the C++ compiler torch's builder calls (``CXX``, else ``c++``) is on PATH: where it is, a failed build
    is a bug to report, not a missing tool."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary sits beside this interpreter."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


@functools.cache
def load() -> bool:
    """Build (first time) and load the kernels into ``torch.ops.hf_vram_cpu``; False, with one warning saying why,
    when they are off or cannot be built."""
    if os.environ.get("HF_VRAM_CPU_KERNELS", "1") == "0":
        return False
    isa = target_isa()
    flags = ["-O3", "-fopenmp", *([f"-march={isa}"] if isa else [])]
    name = "hf_vram_cpu_" + (isa or platform.machine()).replace("-", "_")
    try:
        from torch.utils.cpp_extension import load as build

        _ninja_on_path()
        build(
            name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the process already has torch's, which the loader reuses
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means the torch path, said once
        warnings.warn(
            f"hf_vram: its CPU kernels could not be built ({type(error).__name__}: ...{str(error)[-600:]}); "
            "continuous batching's decodes over quantized K/V pages take torch's slower gather-and-dequantize path, "
            "and int8 layers torch's packed kernel. "
            "Install gcc and ninja (pip install ninja) to build them, or set HF_VRAM_CPU_KERNELS=0 to silence this.",
            stacklevel=2,
        )
        return False
    return all(hasattr(torch.ops.hf_vram_cpu, op) for op in OPS)


if __name__ == "__main__":
    print(f"hf_vram CPU kernels for {target_isa()}: {'loaded' if load() else 'not available'}")
