"""The GPU check as the device call runs it, proven on the CPU: carried wheels installed with no index, the dry run
(TRITON_INTERPRET=1, tiny shapes and model) fills every table (continuous batching's with the Triton decode kernel
forced on the CPU tensors), and the tree plus wheels fit the 64 MiB a call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_call_runs_from_carried_wheels_alone(tmp_path):
    """The path the GPU machine takes, on the CPU: ``gpu_wheels.py`` fetches the pinned wheels and checks that tree
    plus wheels travel under 64 MiB; a fresh venv that sees only the "image" (this environment's packages, torch from
    this machine's disk, through a .pth line) runs ``gpu_check.sh``, which installs the wheels with ``--no-index``
    and runs the dry run under ``TRITON_INTERPRET=1``, with Transformers loaded from the carried wheel."""
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "gpu.json"
    fetched = subprocess.run(
        [sys.executable, "benchmarks/gpu_wheels.py", "--dest", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert sorted(w.name.split("-")[0] for w in wheels.glob("*.whl")) == ["bitsandbytes", "regex", "torchao", "transformers"]
    travelling = float(fetched.stdout.strip().splitlines()[-1].split()[0])
    assert 0 < travelling < 64, fetched.stdout

    if sys.version_info[:2] != (3, 12):  # regex is built per CPython; the image is 3.12, and this "image" has regex
        for wheel in wheels.glob("regex-*.whl"):
            wheel.unlink()
    env = tmp_path / "image"
    venv.create(env, with_pip=False)
    env_site = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    env_site.mkdir(parents=True, exist_ok=True)
    (env_site / "image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    variables = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    variables |= {"PY": str(env / "bin" / "python"), "GPU_SITE": str(site), "GPU_WHEELS": str(wheels)}
    variables |= {"TRITON_INTERPRET": "1", "PIP_NO_INDEX": "1"}

    def device_call(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env=variables,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = device_call()
    assert "## GPU check" in proc.stdout and "| paged decode |" in proc.stdout and "| int4 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"]["transformers_from"].startswith(str(site)), result["device"]
    assert result["versions"]["transformers"] == "5.24.0"
    kernels = {r["kernel"] for r in result["parts"]["kernels"]}
    assert {"int8 weight-only", "w8a8", "flash attention", "add + RMSNorm", "paged decode"} <= kernels
    assert {"paged rows decode, int8", "paged rows decode, int4 (KIVI)"} <= kernels
    # the A/B rows of the decode splits, where the tiny shapes split (the interpreter pretends 4 SMs)
    assert {"int8 weight-only, K unsplit", "int4 g64, K unsplit", "paged rows decode, int8, rows unsplit"} <= kernels
    assert all(r["pass"] for r in result["parts"]["kernels"])
    batching = {r["kv"]: r for r in result["parts"]["batching"]}
    assert set(batching) == {"model dtype", "int8", "int4"} and not [r for r in batching.values() if "error" in r]
    assert all(batching[kv]["tokens_equal"] == batching[kv]["tokens"] > 0 for kv in ("int8", "int4"))
    configs = {r["config"]: r for r in result["parts"]["models"]}
    assert set(configs) == {"fp32", "int8", "int4", "w8a8", "fused", "serving"}
    assert not [r for r in configs.values() if "error" in r]
    assert configs["int4"]["weights_mib"] < configs["fp32"]["weights_mib"] and configs["int8"]["compiled_decode_tok_s"] > 0
    assert configs["fp32"]["logits_rel_err"] == 0 and 0 < configs["int8"]["logits_rel_err"] < configs["int4"]["logits_rel_err"]
    for config in ("fp32", "int8"):  # where eager decode spends its time (the H200's plain-model anomaly)
        profiled = configs[config]["eager_decode_profile"]
        assert profiled["wall_ms"] > 0 and profiled["host"] and all(ms >= 0 and calls > 0 for _, ms, calls in profiled["host"])
    assert "eager_decode_profile" not in configs["int4"]

    # A second, short call finishes one part and keeps the others from the first (same card, rows unchanged).
    device_call("--parts", "models")
    again = json.loads(out.read_text())
    assert again["parts"]["kernels"] == result["parts"]["kernels"] and again["parts"]["batching"] == result["parts"]["batching"]
    assert {r["config"] for r in again["parts"]["models"]} == set(configs)
    assert set(again["part_runs"]) == {"kernels", "batching", "models"}


def test_a_partial_rerun_needs_earlier_results_from_the_same_card(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_check import keep_earlier_parts

    header = {"device": {"card": "NVIDIA H200"}, "date": "2026-12-04 13:37", "parts": {}}
    with pytest.raises(SystemExit, match="no earlier results"):
        keep_earlier_parts(tmp_path / "none.json", header, ["models"])
    earlier = tmp_path / "gpu.json"
    earlier.write_text(json.dumps({"device": {"card": "NVIDIA H100"}, "date": "2026-12-01 10:00", "parts": {}}))
    with pytest.raises(SystemExit, match="rerun every part"):
        keep_earlier_parts(earlier, header, ["models"])
    rows = {"kernels": [{"kernel": "int8 weight-only"}], "models": [{"config": "fp16"}]}
    earlier.write_text(json.dumps({"device": {"card": "NVIDIA H200"}, "date": "2026-12-04 13:24", "parts": rows}))
    kept = keep_earlier_parts(earlier, header, ["models"])
    assert kept["parts"] == {"kernels": rows["kernels"]} and kept["part_runs"] == {"kernels": "2026-12-04 13:24"}


def test_gpu_check_refuses_unknown_parts():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--parts", "modelz"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 2 and "--parts takes" in proc.stderr


def test_the_device_call_without_wheels_names_the_make_target(tmp_path):
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPU_WHEELS": str(tmp_path / "none")},
    )
    assert proc.returncode == 2 and "make gpu-wheels" in proc.stderr


def test_gpu_check_refuses_to_run_without_a_gpu_or_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
