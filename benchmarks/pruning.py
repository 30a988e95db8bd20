"""Pruning benchmark on SmolLM2-135M-Instruct (CPU): perplexity and bytes saved by ratio and scoring method.

For each method the scores are computed once on the float model (calibration: the end of the pydoc text) and each
ratio is a one-step plan from them, applied to a fresh copy; perplexity is measured on the beginning of the text.
The time of a whole ``prune_model`` run (scoring + selection + surgery, 30% heads and 20% channels) is reported per
method, and the sparsity rows show bytes really saved. Writes ``benchmarks/results/pruning.json``.
Usage: ``python benchmarks/pruning.py [--tokens 8192]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, results_path, versions  # noqa: E402

RESULTS = results_path("pruning")
HEAD_RATIOS = (0.1, 0.2, 0.3, 0.5)
MLP_RATIOS = (0.1, 0.2, 0.3)


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _timings(base) -> dict[str, float]:
    """Seconds of a whole ``prune_model`` (score, select, cut) at 30% heads + 20% channels, per method."""
    from hf_vram.config import PruningSection
    from hf_vram.pruning import METHODS, prune_model

    timings = {}
    for method in METHODS:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        prune_model(model, PruningSection(enabled=True, head_ratio=0.3, mlp_ratio=0.2, method=method))
        timings[method] = time.perf_counter() - t0
        del model
    return timings


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.config import PruningSection
    from hf_vram.evaluation import perplexity, token_stream
    from hf_vram.pruning import METHODS, apply_plan, compute_scores, prune_model, sparsity_report
    from hf_vram.pruning.prune import default_pruning_ids
    from hf_vram.pruning.selection import select
    from hf_vram.pruning.surgery import applied_plan

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--timings-only", action="store_true", help="re-measure only the prune_model timings")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = smollm2_path()
    ids = token_stream(AutoTokenizer.from_pretrained(path), pydoc_text(), args.tokens)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base_bytes = _param_bytes(base)
    section = PruningSection()
    calibration = default_pruning_ids(base, section)
    if args.timings_only:
        result = json.loads(RESULTS.read_text())
        result["prune_30h_20m_seconds"] = _timings(base)
        RESULTS.write_text(json.dumps(result, indent=1))
        return
    result = {"machine": machine(), "versions": versions(), "tokens": args.tokens, "date": time.strftime("%Y-%m-%d")}
    result["fp32_ppl"] = perplexity(base, ids)
    result["fp32_mib"] = base_bytes / 2**20
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        scores = compute_scores(base, method, calibration, seed=section.seed)
        score_s = time.perf_counter() - t0
        for kind, ratios in (("heads", HEAD_RATIOS), ("mlp", MLP_RATIOS)):
            for ratio in ratios:
                model = copy.deepcopy(base)
                plan = select(applied_plan(model), scores, ratio if kind == "heads" else 0.0, ratio if kind == "mlp" else 0.0, 1)
                apply_plan(model, plan)
                summary = plan.summary()
                rows.append(
                    {
                        "method": method,
                        "kind": kind,
                        "ratio": ratio,
                        "achieved": summary["head_ratio"] if kind == "heads" else summary["mlp_ratio"],
                        "ppl": perplexity(model, ids),
                        "saved_mib": (base_bytes - _param_bytes(model)) / 2**20,
                        "score_s": score_s,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del model
    result["prune_30h_20m_seconds"] = _timings(base)
    sparse = []
    for kind in ("unstructured", "block16"):
        model = copy.deepcopy(base)
        prune_model(model, PruningSection(enabled=True, sparsity=kind, sparsity_ratio=0.5))
        report = sparsity_report(model)
        sparse.append(
            {
                "kind": kind,
                "ratio": 0.5,
                "ppl": perplexity(model, ids),
                "saved_mib": (base_bytes - _param_bytes(model)) / 2**20,
                "block_sparse_saved_mib": report["bytes_saved"] / 2**20,
            }
        )
        print(json.dumps(sparse[-1]), flush=True)
    result["rows"], result["sparsity"] = rows, sparse
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))


def tables(result: dict) -> list[str]:
    """Markdown for BENCHMARKS.md."""
    lines = [
        "## Structured pruning on SmolLM2-135M-Instruct (`benchmarks/pruning.py`, CPU)",
        "",
        f"Run {result['date']} on {result['machine']}. fp32 perplexity {result['fp32_ppl']:.3f} on the first "
        f"{result['tokens']} pydoc tokens; weights {result['fp32_mib']:.1f} MiB fp32.",
        "",
        "| pruned | ratio (achieved) | MiB saved (fp32) | taylor ppl | activation ppl | magnitude ppl | random ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key: dict = {}
    for r in result["rows"]:
        by_key.setdefault((r["kind"], r["ratio"]), {})[r["method"]] = r
    for (kind, ratio), cells in by_key.items():
        first = cells.get("taylor") or next(iter(cells.values()))
        what = "attention heads" if kind == "heads" else "MLP channels"
        ppl = " | ".join(f"{cells[m]['ppl']:.2f}" if m in cells else "" for m in ("taylor", "activation", "magnitude", "random"))
        lines.append(f"| {what} | {ratio:.0%} ({first['achieved']:.1%}) | {first['saved_mib']:.1f} | {ppl} |")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result["prune_30h_20m_seconds"].items())
    lines += [
        "",
        f"Time of a whole `prune_model` run (score, select, cut; 30% heads + 20% channels): {timing}.",
        "",
        "Weight sparsity at 50% (magnitude), bytes really saved:",
        "",
        "| sparsity | ppl | MiB saved |",
        "|---|---|---|",
    ]
    for s in result["sparsity"]:
        lines.append(f"| {s['kind']} 50% | {s['ppl']:.2f} | {s['saved_mib']:.1f} |")
    lines += [
        "",
        "Unstructured zeros stay in dense tensors and save nothing; 16x16 block sparsity stores only kept blocks (BSR) "
        "and is multiplied with torch's sparse CPU kernels.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
