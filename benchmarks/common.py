"""What every benchmark records beside its numbers: the machine (CPU model and the flags that change kernel speed),
the versions, and where its results go.

Results are kept per CPU family (``benchmarks/results/<family>/<name>.json``, family from
``hf_vram.kernels.cpu_caps.cpu_family``: ``avx2``, ``avx512``, ``avx512-amx``), since torch's CPU kernels and their
speeds differ between the AMD (AVX2) and Intel (AVX-512, AMX) machines this project runs on; a run on one family
never overwrites the other's tables. GPU results go to ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
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


# -- the parent/child protocol: every measurement runs in a fresh process that prints one RESULT line -------------
RESULT = "RESULT "


def emit(result: dict) -> None:
    """What a measuring child process prints for its parent: one line, JSON."""
    print(RESULT + json.dumps(result), flush=True)


def child_env() -> dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` and the caller's entries after it (e.g. a newer
    Transformers installed with ``pip install --target`` to measure beside the venv's): what a benchmark's child
    processes run with."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run_child(args: list[str], *, python: str = sys.executable, fallback: dict | None = None, **kwargs) -> dict:
    """Run ``python *args``; its last RESULT line as a dict, or ``{**fallback, "error": its last stderr line}``.
    ``kwargs`` go to ``subprocess.run`` (``env``, ``cwd``)."""
    proc = subprocess.run([python, *args], capture_output=True, text=True, **kwargs)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT) :])
    return {**(fallback or {}), "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def merge_rerun(path: Path, rows: list[dict], key: str = "name") -> list[dict]:
    """Rows re-measured with ``--only`` replace their namesakes in the last full run saved at ``path``, in its order;
    each carries the time it was re-measured."""
    if not path.is_file():
        return rows
    fresh = {r[key]: {**r, "rerun": time.strftime("%Y-%m-%d %H:%M")} for r in rows}
    return [fresh.pop(r[key], r) for r in json.loads(path.read_text())["rows"]] + list(fresh.values())


def write_result(path: Path, result: dict) -> None:
    """Save a benchmark's result beside its machine and versions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "versions": versions(), **result}, indent=1, default=str))
