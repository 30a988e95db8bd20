"""Run a check on one of torch's CPU kernel paths (AVX2, AVX-512, ...) in a fresh process: the path is fixed when
torch starts, so a test on an AVX-512 machine reaches the AVX2 kernels only this way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def assert_passes_on_path(capability: str, code: str) -> None:
    """Run ``code`` with ``ATEN_CPU_CAPABILITY=capability``; it must exit cleanly, on that path."""
    code += "\nimport torch\nprint(torch.backends.cpu.get_cpu_capability())\n"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].lower() == capability.lower()
