"""Every kernel entry, fuzzed with misaligned, strided and ragged inputs in subprocesses, on each reachable CPU path.

A kernel that crashes kills only its worker: the case is reported by name and the worker restarts after it, so one
test run lists every crashing and every wrong case. CPU entries run once per torch CPU path this machine can take
(``ATEN_CPU_CAPABILITY``: default, avx2, and avx512 where the CPU has it); Triton entries run under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vram.kernels.cpu_caps import reachable_capabilities

ROOT = Path(__file__).resolve().parents[2]
MAX_CRASHES = 25


def run_fuzz(suite: str, env_extra: dict[str, str]) -> tuple[list[str], list[str], int]:
    """(crashed case names, failed cases with reasons, cases run) for one suite in restarting workers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    start, crashed, failed, ran = 0, [], [], 0
    while True:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.kernels.fuzz_worker", suite, "--start", str(start)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        names, open_case = {}, None
        for line in proc.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            index, _, detail = rest.partition(" ")
            if kind == "BEGIN":
                names[int(index)] = detail
                open_case = int(index)
            elif kind in ("PASS", "FAIL"):
                ran += 1
                open_case = None
                if kind == "FAIL":
                    failed.append(f"{names[int(index)]}: {detail}")
        if proc.returncode == 0 and open_case is None:
            return crashed, failed, ran
        if open_case is None:  # died outside any case: the worker itself is broken
            raise AssertionError(f"fuzz worker {suite} exited {proc.returncode} outside a case: {proc.stderr[-2000:]}")
        crashed.append(f"{names[open_case]} (exit {proc.returncode})")
        ran += 1
        if len(crashed) >= MAX_CRASHES:
            return crashed, failed, ran
        start = open_case + 1


@pytest.mark.parametrize("capability", reachable_capabilities())
def test_cpu_kernel_entries_survive_bad_layouts_on_each_cpu_path(capability):
    crashed, failed, ran = run_fuzz("cpu", {"ATEN_CPU_CAPABILITY": capability})
    assert ran > 300
    assert not crashed, f"{len(crashed)} case(s) crashed on the {capability} path:\n" + "\n".join(crashed)
    assert not failed, f"{len(failed)} case(s) gave wrong results on the {capability} path:\n" + "\n".join(failed)


def test_triton_kernel_entries_survive_bad_layouts_under_the_interpreter():
    crashed, failed, ran = run_fuzz("triton", {"TRITON_INTERPRET": "1"})
    assert ran >= 20
    assert not crashed, "\n".join(crashed)
    assert not failed, "\n".join(failed)


def test_the_harness_names_a_crashing_case_and_goes_on():
    crashed, failed, ran = run_fuzz("selftest", {})
    assert len(crashed) == 1 and crashed[0].startswith("segfault on purpose (exit -11)")
    assert failed == [] and ran == 3  # the cases before and after the crash both ran
