"""The README's main job (the CLI) and the example scripts run, and bad input exits 2 with the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


def test_cli_optimize_prints_before_after_table(tmp_path):
    proc = _run("-m", "hf_vram.cli", "optimize", "--preset", "int8", "--tokens", "512", "--save", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("SmolLM2 weights and perplexity")[1].splitlines()
    float_row = next(r for r in table if r.startswith("float32")).split()
    int8_row = next(r for r in table if r.startswith("int8")).split()
    assert float(int8_row[1]) < 0.3 * float(float_row[1])  # MiB
    assert (tmp_path / "out" / "model.safetensors").is_file()
    report = _run("-m", "hf_vram.cli", "report", str(tmp_path / "out"))
    assert report.returncode == 0 and "quantized weights" in report.stdout


def test_cli_serving_preset_fuses_quantizes_and_pools(tmp_path):
    """int8 + fusion + pooled KV through from_pretrained on SmolLM2; the saved model reloads fused and pooled."""
    proc = _run("-m", "hf_vram.cli", "optimize", "--preset", "serving", "--tokens", "512", "--save", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("SmolLM2 weights and perplexity")[1].splitlines()
    base = float(next(r for r in table if r.startswith("float32")).split()[3])
    served = float(next(r for r in table if r.startswith("serving")).split()[3])
    assert base < served < 1.02 * base
    check = (
        "import hf_vram, torch; from transformers import AutoModelForCausalLM as A; "
        f"m = A.from_pretrained({str(tmp_path / 's')!r}); "
        "assert m.config._attn_implementation == 'hf_vram'; "
        "m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False); "
        "print(m.hf_vram_kv_pool.stats()['high_water_blocks'])"
    )
    reload = _run("-c", check)
    assert reload.returncode == 0, reload.stderr[-2000:]
    assert int(reload.stdout.strip().splitlines()[-1]) >= 1


def test_cli_bad_preset_exits_2_with_the_choices():
    proc = _run("-m", "hf_vram.cli", "optimize", "--preset", "int5")
    assert proc.returncode == 2
    assert "no preset named 'int5'" in proc.stderr and "int8" in proc.stderr


def test_quickstart_example_reloads_identically():
    proc = _run("examples/quickstart.py", "int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical generation = True" in proc.stdout
