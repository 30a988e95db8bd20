"""Distributed recovery: the example script under ``accelerate launch`` with 2 CPU processes (DDP, FSDP; gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("launch_config", "port"), [("ddp_cpu", 29517), ("fsdp_cpu", 29518)])
def test_two_process_recovery_completes_and_processes_agree(tiny_dirs, tmp_path, launch_config, port):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"{launch_config}.yaml"),
        "--main_process_port",
        str(port),
        str(ROOT / "examples" / "prune_and_recover.py"),
        "--model",
        str(tiny_dirs["llama"]),
        "--random-data",
        "--steps",
        "4",
        "--window",
        "32",
        "--head-ratio",
        "0.25",
        "--mlp-ratio",
        "0.25",
        "--group-size",
        "32",
        "--output",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out.ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]  # the processes hold the same adapters
    assert "reload it identically: True" in proc.stdout
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
