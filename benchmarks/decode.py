"""Compiled decode: bf16 eager and compiled, hf_vram's schemes compiled, torchao int8 compiled, side by side (CPU).

Each configuration runs in a fresh subprocess (``--one NAME``). Per row: decode tokens/s of greedy generation
(64 new tokens after a 128-token prompt, batch 1 and batch 8, median of 3 after a warm-up that compiles), the
compile seconds (first call minus a steady call), perplexity of the compiled forward against the eager one (4096
pydoc tokens, 512-token windows, batch 4) and greedy tokens compiled vs eager (30 after a 128-token prompt).
Compiled decode is ``generate(cache_implementation="static", compile_config=...)`` with ``fullgraph=True``
(``hf_vram.evaluation.compiled_generate_kwargs``). Usage: ``python benchmarks/decode.py [--only 'a;b']``;
writes ``benchmarks/results/<family>/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import emit, merge_rerun, results_path, run_child, write_result  # noqa: E402

# name -> (how to load, compiled?)
CONFIGS = {
    "bf16 eager": ("bf16", False),
    "bf16 compiled": ("bf16", True),
    "fp32 compiled": ("fp32", True),
    "torchao int8 weight-only compiled": ("torchao-int8", True),
    "hf_vram int8 eager": ("int8", False),
    "hf_vram int8 compiled": ("int8", True),
    "hf_vram int4 g128 compiled": ("int4", True),
    "hf_vram w8a8 compiled": ("w8a8", True),
}
# hf_vram rows: the preset's layers without calibration (speed does not depend on the scales' values; calibration
# would add minutes of loading to every row), with the embedding and tied head in int8 as the presets have them.
SCHEMES = {
    "int8": {"scheme": "int8", "quantize_embeddings": True},
    "int4": {"scheme": "int4", "group_size": 128, "quantize_embeddings": True, "scale_search": "none"},
    "w8a8": {"scheme": "w8a8", "quantize_embeddings": True},
}
PPL_TOKENS = 4096
# The ops that multiply by weights in a decode step, per scheme (their self time is the "matmul" share of a step).
MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::linear",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
    "quantized::linear_dynamic",
    "hf_vram::int8_linear",
    "hf_vram::int4_linear",
    "hf_vram::w8a8_linear",
)


def _load(kind: str):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_vram
    from hf_vram.assets import smollm2_path

    path = smollm2_path()
    if kind in ("bf16", "fp32"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[kind]))
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)
    config = hf_vram.VramOptimizationConfig(quantization=SCHEMES[kind])
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)


def run_one(name: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import decode_rate, greedy_tokens, perplexity, token_stream

    kind, compiled = CONFIGS[name]
    ids = token_stream(AutoTokenizer.from_pretrained(smollm2_path()), pydoc_text(), PPL_TOKENS)
    model = _load(kind).eval()
    prompt = ids[:128][None]
    row: dict = {"name": name, "compiled": compiled}
    for batch in (1, 8):
        prompts = prompt.expand(batch, -1).contiguous()
        t0 = time.perf_counter()
        decode_rate(model, prompts, new_tokens=64, compiled=compiled)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        rates = [decode_rate(model, prompts, new_tokens=64, compiled=compiled) for _ in range(3)]
        steady = (time.perf_counter() - t0) / 3
        row[f"tok_s_b{batch}"] = statistics.median(rates)
        if compiled:
            row[f"compile_s_b{batch}"] = first - steady
    if compiled:
        row["anatomy"] = anatomy(model, prompt)
    row["ppl_eager"] = perplexity(model, ids)
    eager_tokens = greedy_tokens(model, ids[:128])
    if compiled:
        forward = model.forward
        model.forward = torch.compile(forward, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        row["ppl_compiled"] = perplexity(model, ids)
        row["ppl_compile_s"] = time.perf_counter() - t0
        model.forward = forward
        compiled_tokens = greedy_tokens(model, ids[:128], compiled=True)
        row["greedy_equal"] = sum(a == b for a, b in zip(compiled_tokens, eager_tokens, strict=True))
    return row


def anatomy(model, prompt, steps: int = 32) -> dict:
    """Where a compiled decode step's time goes: the weight matmuls' self time against the whole step, from two
    profiled generates (2 and 2 + ``steps`` new tokens) whose difference leaves only decode steps."""
    import torch
    from quantization import _tensor_bytes  # counts torchao's tensor subclasses too (memory_report cannot)

    from hf_vram.evaluation import decode_rate

    def profile(new_tokens: int) -> tuple[float, dict[str, float]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            decode_rate(model, prompt, new_tokens=new_tokens, compiled=True)
            wall = time.perf_counter() - t0
        return wall, {e.key: e.self_cpu_time_total for e in prof.key_averages()}

    decode_rate(model, prompt, new_tokens=2 + steps, compiled=True)  # the cache shape of both runs below
    wall_short, short = profile(2)
    wall_long, long = profile(2 + steps)
    matmul_us = sum(long.get(k, 0.0) - short.get(k, 0.0) for k in MATMUL_OPS)
    return {
        "step_ms": (wall_long - wall_short) / steps * 1e3,
        "matmul_ms": matmul_us / steps / 1e3,
        "weight_mib_per_step": _tensor_bytes(model) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(args.one))
        return
    names = [n for n in CONFIGS if not args.only or n in args.only.split(";")]
    rows = []
    for name in names:
        t0 = time.time()
        rows.append(run_child([__file__, "--one", name], fallback={"name": name}))
        print(f"{name}: {time.time() - t0:.0f}s {json.dumps(rows[-1])}", flush=True)
    path = results_path("decode")
    if args.only:
        rows = merge_rerun(path, rows)
    write_result(path, {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows})
    print("\n".join(tables(json.loads(path.read_text()))))


def tables(result: dict) -> list[str]:
    rows = {r["name"]: r for r in result["rows"]}
    base = rows.get("bf16 compiled", {})
    lines = [
        "### Compiled decode on SmolLM2-135M-Instruct (`benchmarks/decode.py`)",
        "",
        f"Run {result['date']} on {result['machine']}, every row in a fresh process. Greedy decode, 64 new tokens "
        "after a 128-token prompt, median of 3 after a warm-up; compiled = `torch.compile(fullgraph=True)` of the "
        'decode step through `generate(cache_implementation="static", compile_config=...)`. Compile s: the '
        "warm-up call minus a steady call. Perplexity: 4096 pydoc tokens in 512-token windows, eager forward and "
        "compiled forward. hf_vram rows: the presets' layers (embedding and tied head int8) without calibration.",
        "",
        "| config | tok/s batch 1 | x bf16 compiled | tok/s batch 8 | x bf16 compiled | compile s (b1 / b8) | "
        "ppl eager | ppl compiled | greedy equal (of 30) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:150]} | | | | | | | |")
            continue
        x1 = f"{r['tok_s_b1'] / base['tok_s_b1']:.2f}x" if base else ""
        x8 = f"{r['tok_s_b8'] / base['tok_s_b8']:.2f}x" if base else ""
        compile_s = f"{r['compile_s_b1']:.0f} / {r['compile_s_b8']:.0f}" if r["compiled"] else "-"
        ppl_c = f"{r['ppl_compiled']:.3f} ({100 * (r['ppl_compiled'] / r['ppl_eager'] - 1):+.2f}%)" if r["compiled"] else "-"
        same = r.get("greedy_equal", "-")
        lines.append(
            f"| {r['name']} | {r['tok_s_b1']:.1f} | {x1} | {r['tok_s_b8']:.1f} | {x8} | {compile_s} | "
            f"{r['ppl_eager']:.3f} | {ppl_c} | {same} |"
        )
    anatomy_rows = [r for r in result["rows"] if r.get("anatomy")]
    if anatomy_rows:
        lines += [
            "",
            "Where a compiled decode step goes (batch 1, profiled: two generates of 2 and 34 new tokens, "
            "differenced; the profiler itself slows every step):",
            "",
            "| config | step ms | weight matmuls ms | rest ms | weights read per step MiB | GB/s in the matmuls |",
            "|---|---|---|---|---|---|",
        ]
        for r in anatomy_rows:
            a = r["anatomy"]
            rate = a["weight_mib_per_step"] * 2**20 / 1e9 / (a["matmul_ms"] / 1e3) if a["matmul_ms"] else float("nan")
            lines.append(
                f"| {r['name']} | {a['step_ms']:.1f} | {a['matmul_ms']:.1f} | {a['step_ms'] - a['matmul_ms']:.1f} | "
                f"{a['weight_mib_per_step']:.0f} | {rate:.1f} |"
            )
    return lines + [""]


if __name__ == "__main__":
    main()
