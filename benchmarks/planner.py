"""Estimator accuracy and budget planner on SmolLM2-135M-Instruct (CPU).

Estimator: ``hf_vram.estimate(folder, config, batch=4, seq_len=512)`` (meta device, nothing loaded) against the
loaded model (``memory_report``) and a filled cache (a DynamicCache after a 4 x 512 forward; the pooled cache's
blocks in use for the ``serving`` preset). Activations: the estimate against the tracked peak of the same forward
(last-token logits), informational.
Planner: budgets of 60%, 40% and 25% of SmolLM2's bf16 weight bytes. ``VramOptimizationConfig(target_memory=...)``
against the best uniform scheme that fits the same budget (int8 everywhere, else int4 g128 everywhere, else int4
with the same MLP-channel ratio in every layer, Taylor scores), perplexity on the first ``--tokens`` pydoc tokens.
Context: plans that must also hold one 8192-token sequence (its K/V storage and prefill chunk chosen with the
weights), measured against their estimate.
Usage: ``python benchmarks/planner.py [--tokens 8192] [--context-only]``; writes ``benchmarks/results/planner.json``.
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

RESULTS = results_path("planner")
ESTIMATE_CONFIGS = {
    "float32": {},
    "int8": {"quantization": {"scheme": "int8", "quantize_embeddings": True}},
    "int4 g128": {"quantization": {"scheme": "int4", "group_size": 128}},
    "w8a8": {"quantization": {"scheme": "w8a8"}},
    "int4-pruned preset": "int4-pruned",
    "serving preset (pooled KV)": "serving",
}


def estimator_rows(path: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, DynamicCache

    import hf_vram
    from hf_vram.kvcache import KVCachePool, PooledKVCache
    from hf_vram.planner import cache_bytes

    rows = []
    ids = torch.randint(0, 49152, (4, 512), generator=torch.Generator().manual_seed(0))
    for label, cfg in ESTIMATE_CONFIGS.items():
        config = hf_vram.config.as_config(copy.deepcopy(cfg))
        est = hf_vram.estimate(path, config, batch=4, seq_len=512)
        kwargs = {"quantization_config": config} if config.enabled_sections else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
        if config.kv_cache.enabled:
            cache = PooledKVCache(KVCachePool.for_model(model, num_blocks=4 * 512 // 16 + 8, dtype=config.kv_cache.dtype))
        else:
            cache = DynamicCache(config=model.config)
        with torch.no_grad(), hf_vram.track_peak_memory() as peak:
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        rows.append(
            {
                "config": label,
                "weights_est_mib": est.weights_bytes / 2**20,
                "weights_mib": hf_vram.memory_report(model).total / 2**20,
                "kv_est_mib": est.kv_cache_bytes / 2**20,
                "kv_mib": cache_bytes(cache) / 2**20,
                "kv_dtype": est.kv_dtype,
                "act_est_mib": est.activation_bytes / 2**20,
                "act_mib": peak.peak_mib,
            }
        )
        print(rows[-1], flush=True)
        del model, cache
    return rows


def _uniform(base, budget: int, path: Path) -> tuple[str, dict]:
    """The best uniform scheme that fits: int8, int4, or int4 + the same MLP ratio in every layer."""
    import hf_vram

    layers = base.config.num_hidden_layers
    candidates = [
        ("int8 everywhere", {"quantization": {"scheme": "int8", "quantize_embeddings": True}}),
        ("int4 g128 everywhere", {"quantization": {"scheme": "int4", "quantize_embeddings": True}}),
    ]
    for k in range(1, 11):
        r = round(0.05 * k, 2)
        candidates.append(
            (
                f"int4 + {r:.0%} MLP channels in every layer",
                {
                    "quantization": {"scheme": "int4", "quantize_embeddings": True},
                    "pruning": {"mlp_ratio": dict.fromkeys(range(layers), r), "method": "taylor"},
                },
            )
        )
    for label, cfg in candidates:
        if hf_vram.estimate(path, cfg, batch=1, seq_len=1).weights_bytes <= budget:
            return label, cfg
    raise ValueError("no uniform scheme fits")


def planner_rows(base, path: Path, ids: torch.Tensor, calibration: torch.Tensor) -> list[dict]:
    import hf_vram
    from hf_vram.evaluation import perplexity

    bf16 = sum(p.numel() for p in base.parameters()) * 2
    rows = []
    for fraction in (0.6, 0.4, 0.25):
        budget = int(bf16 * fraction)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        config = hf_vram.VramOptimizationConfig(target_memory=budget)
        hf_vram.optimize(model, config, calibration)
        plan_s = time.perf_counter() - t0
        planned = {
            "bytes": hf_vram.memory_report(model).total,
            "ppl": perplexity(model, ids),
            "seconds": plan_s,
            "plan": model.config.quantization_config.planner.plan,
        }
        del model
        label, cfg = _uniform(base, budget, path)
        model = copy.deepcopy(base)
        hf_vram.optimize(model, cfg, calibration)
        uniform = {"label": label, "bytes": hf_vram.memory_report(model).total, "ppl": perplexity(model, ids)}
        del model
        rows.append({"fraction": fraction, "budget": budget, "planner": planned, "uniform": uniform})
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


CONTEXT = 8192
CONTEXT_KV = ("auto", "int8", "int4")


def context_rows(base, calibration: torch.Tensor, ids: torch.Tensor) -> list[dict]:
    """Plans for one 8192-token sequence beside the weights, at budgets cut between what the float model needs in
    one pass and much less: the planner picks the weights, the K/V storage and the prefill chunk together."""
    import hf_vram
    from hf_vram.planner.budget import PREFILL_CHUNKS
    from hf_vram.planner.estimate import context_bytes, measure_activations

    act, kv = context_bytes(base, hf_vram.VramOptimizationConfig(), CONTEXT, PREFILL_CHUNKS, CONTEXT_KV)
    weights = hf_vram.memory_report(base).total  # replaced below by the planner's float weights (embedding in int8)
    budgets = {"float weights, float K/V, one pass": lambda w: w + kv["auto"] + act[None]}
    budgets["float weights, float K/V, chunks of 2048"] = lambda w: w + kv["auto"] + act[2048]
    budgets["float weights, int8 K/V, chunks of 512"] = lambda w: w + kv["int8"] + act[512]
    budgets["half the float weights, int4 K/V, chunks of 512"] = lambda w: w // 2 + kv["int4"] + act[512]
    rows = []
    for label, sized in budgets.items():
        budget = sized(weights)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        planner = {"target_memory": budget, "context_tokens": CONTEXT, "kv_dtypes": list(CONTEXT_KV)}
        hf_vram.optimize(model, hf_vram.VramOptimizationConfig(planner=planner), calibration)
        plan = model.config.quantization_config.planner.plan
        if not rows:  # the first budget holds everything: its plan is all float, its weights the planner's count
            weights = plan["estimated_bytes"] - plan["kv_bytes"] - plan["activation_bytes"]
        row = {"sized_for": label, "budget": budget, "seconds": time.perf_counter() - t0, "plan": plan}
        row["weights"] = hf_vram.memory_report(model).total
        row["act_measured"] = measure_activations(model, ids[None, :CONTEXT], plan["prefill_chunk"])
        row["total_measured"] = row["weights"] + plan["kv_bytes"] + row["act_measured"]
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        del model
    return rows


def tables(result: dict) -> list[str]:
    """Markdown for BENCHMARKS.md (the context plans alone when only they were run on this machine)."""
    return (_estimator_lines(result) if "estimator" in result else []) + _context_lines(result)


def _estimator_lines(result: dict) -> list[str]:
    lines = [
        "## Memory estimator and budget planner (`benchmarks/planner.py`, CPU)",
        "",
        f"Run {result['date']} on {result['machine']}. `hf_vram.estimate(folder, config, batch=4, seq_len=512)` "
        "builds the model on the meta device (no weights read) against the loaded model and a filled cache:",
        "",
        "| config | weights est. / measured MiB | ratio | KV est. / measured MiB | ratio | activations est. / tracked MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["estimator"]:
        lines.append(
            f"| {r['config']} | {r['weights_est_mib']:.2f} / {r['weights_mib']:.2f} | "
            f"{r['weights_mib'] / r['weights_est_mib']:.3f} | {r['kv_est_mib']:.2f} / {r['kv_mib']:.2f} ({r['kv_dtype']}) | "
            f"{r['kv_mib'] / max(r['kv_est_mib'], 1e-9):.3f} | {r['act_est_mib']:.1f} / {r['act_mib']:.1f} |"
        )
    lines += [
        "",
        "The pruned row estimates from the ratios alone: the weight bytes depend only on how many heads and channels "
        "go, the KV bytes also on whether the scores drop whole KV groups or query heads within groups (0.92 here); "
        "estimated from the saved, pruned folder (its plan) both are exact (`tests/planner`). The W8A8 row is off "
        "by FBGEMM's packing overhead. Activations are the peak of live tensors "
        "in a prefill forward that keeps the last token's logits (the KV cache it fills included).",
        "",
        f"Budget planner: `VramOptimizationConfig(target_memory=...)` against the best uniform scheme that fits the "
        f"same budget. Budgets are fractions of SmolLM2's bf16 weight bytes ({result['bf16_mib']:.1f} MiB); "
        f"perplexity on the first {result['tokens']} pydoc tokens (fp32: {result['fp32_ppl']:.3f}).",
        "",
        "| budget | planner plan | planner MiB | planner ppl | uniform scheme | uniform MiB | uniform ppl | plan time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["planner"]:
        p, u, plan = r["planner"], r["uniform"], r["planner"]["plan"]
        what = ", ".join(f"{n} {s}" for s, n in plan["counts"].items() if n)
        if plan["mlp_ratio"]:
            what += f", {plan['mlp_ratio']:.0%} MLP channels (Taylor, global)"
        lines.append(
            f"| {r['fraction']:.0%} ({r['budget'] / 2**20:.1f} MiB) | {what} | {p['bytes'] / 2**20:.1f} | {p['ppl']:.3f} | "
            f"{u['label']} | {u['bytes'] / 2**20:.1f} | {u['ppl']:.3f} | {p['seconds']:.0f} |"
        )
    lines.append("")
    return lines


def _context_lines(result: dict) -> list[str]:
    lines = []
    if result.get("context"):
        run = result["context_run"]
        lines += [
            "## Budget planner with a context length (`benchmarks/planner.py --context-only`, CPU)",
            "",
            f"Run {run['date']} on {run['machine']}. Planning for context: `planner: {{target_memory, context_tokens: {CONTEXT}, kv_dtypes: [auto, int8, "
            "int4]}` on SmolLM2 float32. The budget must also hold one 8192-token sequence: its K/V in the storage "
            "the planner picks and its prefill's activation peak at the chunk size it picks (one pass or 4096 ... "
            "512 tokens; Transformers' `prefill_chunk_size`, set on the model). Budgets are cut to what four plans "
            "would need; 'measured' = the planned model's weights + the K/V bytes of the chosen storage + the "
            "tracked activation peak of an 8192-token pydoc prefill at the chosen chunk size. Loss: the calibration "
            "loss increase (weights), the K/V storage's own measured increase in brackets. The planner's float "
            "weights keep the embedding in int8 (the first row's plan sizes the others).",
            "",
            "| budget sized for | budget MiB | plan: linear layers | K/V | prefill | estimated MiB | measured MiB | "
            "activations est. / measured MiB | loss rise (K/V) | plan s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["context"]:
            plan = r["plan"]
            what = ", ".join(f"{n} {s}" for s, n in plan["counts"].items() if n)
            if plan["mlp_ratio"]:
                what += f", {plan['mlp_ratio']:.0%} MLP channels"
            chunk = f"chunks of {plan['prefill_chunk']}" if plan["prefill_chunk"] else "one pass"
            lines.append(
                f"| {r['sized_for']} | {r['budget'] / 2**20:.1f} | {what} | {plan['kv_dtype']} "
                f"({plan['kv_bytes'] / 2**20:.1f} MiB) | {chunk} | {plan['estimated_bytes'] / 2**20:.1f} | "
                f"{r['total_measured'] / 2**20:.1f} | {plan['activation_bytes'] / 2**20:.1f} / "
                f"{r['act_measured'] / 2**20:.1f} | {plan['measured_loss_increase']:+.4f} "
                f"({plan['kv_loss_increase']:+.4f}) | {r['seconds']:.0f} |"
            )
        options = result["context"][-1]["plan"].get("context_options", {})
        if options:
            costs = ", ".join(f"{n} {b / 2**20:.1f} MiB, loss +{loss:.4f}" for n, (b, loss) in options["kv"].items())
            acts = ", ".join(f"{c}: {b / 2**20:.1f}" for c, b in options["prefill_activations"].items())
            lines += ["", f"What the planner weighed (8192 tokens): K/V {costs}; prefill activations (MiB) {acts}."]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context-only", action="store_true", help="re-measure only the context plans")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from hf_vram.assets import load_smollm2, pydoc_text, smollm2_path
    from hf_vram.data import default_calibration_ids
    from hf_vram.evaluation import perplexity, token_stream

    path = smollm2_path()
    base, tokenizer = load_smollm2()
    ids = token_stream(tokenizer, pydoc_text(), args.tokens)
    calibration = default_calibration_ids(base, 4, 256)  # the end of the text: disjoint from the scored part
    if args.context_only:  # beside this family's other planner tables, if it has them
        result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        result["context"] = context_rows(base, calibration, ids)
        result["context_run"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(torch.get_num_threads())}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1, default=str))
        return
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(torch.get_num_threads()),
        "versions": versions(),
        "tokens": args.tokens,
        "bf16_mib": sum(p.numel() for p in base.parameters()) * 2 / 2**20,
        "fp32_ppl": perplexity(base, ids),
        "estimator": estimator_rows(path),
    }
    result["planner"] = planner_rows(base, path, ids, calibration)
    result["context"] = context_rows(base, calibration, ids)
    result["context_run"] = {"date": result["date"], "machine": result["machine"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
