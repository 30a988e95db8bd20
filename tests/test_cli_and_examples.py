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
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def test_cli_optimize_prints_before_after_table(tmp_path):
    proc = _run(
        "-m",
        "hf_vram.cli",
        "optimize",
        "--preset",
        "int8",
        "--tokens",
        "512",
        "--new-tokens",
        "4",
        "--save",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr and "past_key_values" not in proc.stderr, proc.stderr[-2000:]  # no noise of ours
    table = proc.stdout.split("weights, perplexity")[1].splitlines()
    float_row = next(r for r in table if r.startswith("float32")).split()
    int8_row = next(r for r in table if r.startswith("int8")).split()
    assert float(int8_row[1]) < 0.3 * float(float_row[1])  # MiB
    assert (tmp_path / "out" / "model.safetensors").is_file()
    report = _run("-m", "hf_vram.cli", "report", str(tmp_path / "out"))
    assert report.returncode == 0 and "quantized weights" in report.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| int8 |" in card and "| float32 |" in card and "perplexity" in card  # the measured table
    report = _run("-m", "hf_vram.cli", "report", str(tmp_path / "out"), "--batch", "2", "--seq-len", "64")
    assert report.returncode == 0 and "KV cache" in report.stdout, report.stderr[-2000:]


def test_cli_optimize_compile_reports_compile_time(smollm2_dir, tmp_path):
    """``--compile`` decodes through torch.compile with a static cache and prints the compile seconds (a small
    Llama with SmolLM2's tokenizer keeps the compile short)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    small.save_pretrained(tmp_path / "small")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path / "small")
    proc = _run(
        "-m",
        "hf_vram.cli",
        "optimize",
        "--model",
        str(tmp_path / "small"),
        "--preset",
        "int8",
        "--tokens",
        "512",
        "--new-tokens",
        "8",
        "--compile",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("weights, perplexity")[1].splitlines()
    header = next(line for line in table if line.startswith("config"))
    assert "compile s" in header and "compiled decode, static cache" in header
    row = next(line for line in table if line.startswith("int8")).split()
    assert float(row[-1]) > 0 and float(row[-3]) > 0  # compile seconds, tokens/s


def test_cli_estimate_before_loading_and_target_memory_optimize(tmp_path):
    proc = _run("-m", "hf_vram.cli", "estimate", "--preset", "int4", "--batch", "2", "--seq-len", "256")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert float(rows["int4"][0]) < 0.4 * float(rows["float"][0])  # weights
    assert float(rows["int4"][1]) == float(rows["float"][1]) > 0  # the same fp32 KV cache
    proc = _run(
        "-m",
        "hf_vram.cli",
        "optimize",
        "--target-memory",
        "100MiB",
        "--tokens",
        "512",
        "--new-tokens",
        "0",
        "--quiet",
        "--save",
        str(tmp_path / "planned"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hf_vram plan for a budget of 100.0 MiB" in proc.stdout and "measured:" in proc.stdout
    table = proc.stdout.split("weights, perplexity")[1].splitlines()
    assert float(next(r for r in table if r.startswith("target")).split()[2]) <= 100.0


def test_cli_bench_runs_a_benchmark_script():
    proc = _run("-m", "hf_vram.cli", "bench", "planner", "--no-table", "--", "--help")
    assert proc.returncode == 0 and "--tokens" in proc.stdout, proc.stderr[-2000:]
    proc = _run("-m", "hf_vram.cli", "bench", "nonesuch")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_cli_exit_codes_name_the_fix(tmp_path):
    proc = _run("-m", "hf_vram.cli", "estimate", "--model", str(tmp_path))
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = _run("-m", "hf_vram.cli", "optimize", "--target-memory", "1MB", "--tokens", "512", "--quiet")
    assert proc.returncode == 2 and "nothing fits" in proc.stderr and "Raise target_memory" in proc.stderr
    proc = _run("-m", "hf_vram.cli", "optimize", "--target-memory", "lots")
    assert proc.returncode == 2 and "'600MiB'" in proc.stderr


def test_cli_serving_preset_fuses_quantizes_and_pools(tmp_path):
    """int8 + fusion + pooled KV through from_pretrained on SmolLM2; the saved model reloads fused and pooled."""
    proc = _run("-m", "hf_vram.cli", "optimize", "--preset", "serving", "--tokens", "512", "--save", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("weights, perplexity")[1].splitlines()
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


def test_optimize_in_memory_example_from_gguf():
    proc = _run("examples/optimize_in_memory.py", "int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical generation = True" in proc.stdout and "int8:" in proc.stdout


def test_serve_many_example_leaks_no_page():
    proc = _run("examples/serve_many.py", "--requests", "6", "--new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 requests" in proc.stdout and "KV: 8-bit pages" in proc.stdout and "0 blocks still used" in proc.stdout


def test_fit_budget_example_fits():
    proc = _run("examples/fit_budget.py", "--budget", "120MB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hf_vram plan for a budget" in proc.stdout and ": fits" in proc.stdout


def test_push_to_hub_example_dry_run_writes_the_card(tmp_path):
    proc = _run("examples/push_to_hub.py", "--dry-run", "--output", str(tmp_path / "up"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = (tmp_path / "up" / "README.md").read_text()
    assert "import hf_vram" in card and "| int8 |" in card and (tmp_path / "up" / "hf_vram_manifest.json").is_file()
