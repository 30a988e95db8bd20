"""What every benchmark records beside its numbers: the machine (CPU model and the flags that change kernel speed),
the versions, and where its results go.

Results are kept per CPU family (``benchmarks/results/<family>/<name>.json``, family from
``hf_vram.kernels.cpu_caps.cpu_family``: ``avx2``, ``avx512``, ``avx512-amx``), since torch's CPU kernels and their
speeds differ between the AMD (AVX2) and Intel (AVX-512, AMX) machines this project runs on; a run on one family
never overwrites the other's tables. GPU results go to ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = ROOT / "benchmarks" / "results"
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "torchao",
    "optimum-quanto",
    "hqq",
    "compressed-tensors",
    "hf-vram",
)


def results_path(name: str, family: str | None = None) -> Path:
    """``benchmarks/results/<family>/<name>.json`` for this machine's CPU family (or the one given)."""
    from hf_vram.kernels.cpu_caps import cpu_family

    return RESULTS_ROOT / (family or cpu_family()) / f"{name}.json"


def machine(threads: int = 2) -> str:
    """E.g. ``AMD EPYC (avx2 fma; no AVX-512), torch path AVX2, 2 cores, torch threads 2, Linux x86_64``."""
    from hf_vram.kernels.cpu_caps import cpu_description

    return f"{cpu_description()}, {os.cpu_count()} cores, torch threads {threads}, {platform.system()} {platform.machine()}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
