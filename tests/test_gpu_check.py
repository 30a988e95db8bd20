"""The GPU check script itself works: its dry run (CPU, TRITON_INTERPRET=1, tiny shapes and model) fills every table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_and_prints_its_tables(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## GPU check" in proc.stdout and "| paged decode |" in proc.stdout and "| int4 |" in proc.stdout
    result = json.loads(out.read_text())
    kernels = {r["kernel"] for r in result["parts"]["kernels"]}
    assert {"int8 weight-only", "w8a8", "flash attention", "add + RMSNorm", "paged decode"} <= kernels
    assert all(r["pass"] for r in result["parts"]["kernels"])
    configs = {r["config"]: r for r in result["parts"]["models"]}
    assert set(configs) == {"float", "int8", "int4", "w8a8", "fused", "serving"}
    assert configs["int4"]["weights_mib"] < configs["float"]["weights_mib"] and configs["int8"]["compiled_decode_tok_s"] > 0


def test_gpu_check_refuses_to_run_without_a_gpu_or_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
