"""Many requests, one KV budget: continuous batching with hf_vram's quantized paged KV against the other engines.

SmolLM2-135M-Instruct with hf_vram int8 weights (bfloat16 activations), 64 requests of 128-512 pydoc tokens, 128
new tokens each, greedy, all submitted at once, at one fixed KV memory budget sized to hold about 4 sequences of
the longest kind in bfloat16 K/V. Rows, each in a fresh process: Transformers' continuous batching with bf16 K/V,
and with hf_vram's int8, int4 and int2 K/V pages. The results keep the row of hf_vram's former engine
(``generate_many``: threads over its pool, batch-1 forwards), measured by this script on 2026-12-01 before that
engine was retired for continuous batching; every run keeps rows it does not re-measure. Columns: generated tokens/s over the whole run, the most sequences holding
K/V at once, time to first token and per output token (p50/p99, from Transformers' per-token timestamps), peak RSS,
and greedy agreement: for 16 of the requests (32 new tokens, float32), the new tokens equal to single-request
``generate`` before the first difference. Then KV quality: perplexity over 2048-token pydoc windows when every
past token is read back from quantized pages (``hf_vram.evaluation.quantized_kv_attention``), against bf16 K/V.

Usage: ``python benchmarks/batching.py [--requests 64] [--new-tokens 128] [--only 'row;row'] [--repeat 3] [--no-quality]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_env, emit, merge_rerun, results_path, run_child, write_result  # noqa: E402

RESULTS = results_path("batching")
ROWS = {  # name -> the kv_cache section's settings
    "continuous batching, bf16 KV": {"dtype": "auto"},
    "continuous batching, hf_vram int8 KV": {"dtype": "int8"},
    "continuous batching, hf_vram int4 KV": {"dtype": "int4"},
    "continuous batching, hf_vram int4 KV, sink 64 + recent 64": {"dtype": "int4", "sink_tokens": 64, "recent_tokens": 64},
    "continuous batching, hf_vram int2 KV": {"dtype": "int2"},
}
PAGE = 64  # tokens per page (a multiple of the int4/int2 key group): fine enough that a page's rounding does not decide how many sequences fit
SEQUENCES_IN_BUDGET = 4
AGREEMENT_REQUESTS, AGREEMENT_TOKENS = 16, 32
REPEATED = ("tokens_per_s", "peak_concurrent", "mean_concurrent", "queued_concurrent", "unused_while_queued")


def _prompts(n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path

    ids = AutoTokenizer.from_pretrained(smollm2_path())(pydoc_text(), add_special_tokens=False).input_ids
    lengths = [128 + (384 * i) // max(1, n - 1) for i in range(n)]
    order = [(7 * i) % n for i in range(n)]  # mixed lengths arrive interleaved, not sorted
    return [ids[600 * k : 600 * k + lengths[k]] for k in order]


def _budget_bytes(new_tokens: int) -> int:
    """K/V bytes of SEQUENCES_IN_BUDGET sequences of the longest kind (512 + new tokens) in bfloat16."""
    from transformers import AutoConfig

    from hf_vram.assets import smollm2_path

    c = AutoConfig.from_pretrained(smollm2_path())
    head_dim = c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2
    return SEQUENCES_IN_BUDGET * (512 + new_tokens) * per_token


def _model(kv: dict, dtype: torch.dtype, budget: int):
    from transformers import AutoModelForCausalLM

    import hf_vram
    from hf_vram.assets import smollm2_path

    config = hf_vram.VramOptimizationConfig(
        quantization={"scheme": "int8", "quantize_embeddings": True},
        kv_cache={**kv, "enabled": False, "max_memory": budget},  # int4/int2: the window's reserve included
    )
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=config, dtype=dtype).eval()


def _cb_config():
    """The budget comes from the model's ``kv_cache.max_memory`` (hf_vram sizes the pages in it, for every row)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(page_size=PAGE, max_batch_tokens=512)


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def _concurrency(spans: list[tuple[float, float]]) -> tuple[int, float, float]:
    """The most sequences live at once, the time-weighted mean while any is, and the time-weighted mean while
    requests still wait to start (from the first start to the last: the budget full, before the drain, whose share
    of a run of a fixed number of requests grows with the sequences a budget holds). Request lifespans: from leaving
    the queue to finishing."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    last_start = max(s for s, _ in spans)
    live = peak = 0
    area, busy, queued_area, queued, last = 0.0, 0.0, 0.0, 0.0, events[0][0]
    for t, delta in events:
        if live:
            area += live * (t - last)
            busy += t - last
            if t <= last_start:
                queued_area += live * (t - last)
                queued += t - last
        last = t
        live += delta
        peak = max(peak, live)
    return peak, area / busy if busy else 0.0, queued_area / queued if queued else 0.0


def _unused_while_queued(samples: list[tuple[float, float, int]]) -> float:
    """The time-weighted share of the budget left free while requests waited to start, from ``(time, free share,
    requests waiting)`` at each scheduling: Transformers' own measure (``compute_free_capacity``, what its safety
    margin reads). Memory a budget holds but its requests do not use yet: prompts still to prefill (the first ones,
    and those admitted after a wave of requests finishes), the scheduler's safety margin."""
    area = span = 0.0
    for (t, free, waiting), (later, _, _) in zip(samples, samples[1:], strict=False):
        if waiting:
            area, span = area + free * (later - t), span + later - t
    return area / span if span else 0.0


def _window_blocks(cache) -> float:
    """Blocks of one request's window at its largest: its own blocks, or a borrowing window's cells (a cell per
    token its group's page block does not host, ``per_block`` cells to a block)."""

    def largest(window) -> float:
        if window.borrows:
            return (window.group - window.hosted_tokens) / window.cells.per_block
        return window.blocks_per_slot

    return max((largest(a.window) for a in cache.cache_allocators.values() if hasattr(a, "window")), default=0)


def _run_cb(model, prompts, new_tokens: int) -> tuple[dict, list[list[int]]]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=_cb_config())
    manager.warmup()
    cache = manager.batch_processor.cache
    scheduler = manager.batch_processor.scheduler
    samples: list[tuple[float, float, int]] = []
    schedule = scheduler.schedule_batch

    def sampled(*args, **kwargs):
        samples.append((time.perf_counter(), cache.compute_free_capacity(), len(scheduler.waiting_requests)))
        return schedule(*args, **kwargs)

    scheduler.schedule_batch = sampled
    manager.start()
    t0 = time.perf_counter()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=new_tokens, record_timestamps=True)
    results = {}
    while len(results) < len(ids):
        out = manager.get_result(timeout=5)
        if out is not None and out.is_finished():
            results[out.request_id] = out
        elif out is None and not manager.is_running():
            raise RuntimeError("continuous batching stopped before every request finished")
    elapsed = time.perf_counter() - t0
    manager.stop(block=True)
    outs = [results[i] for i in ids]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    ttft = [o.timestamps[0] - o.created_time for o in outs]
    # a request soft-reset by Transformers (starved, re-prefilled) keeps only the timestamps after its reset: one,
    # if it was reset before its last token, which has no gap to time
    tpot = [(o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1) for o in outs if len(o.timestamps) > 1]
    spans = [(o.lifespan[0], o.lifespan[1]) for o in outs]
    peak, mean, saturated = _concurrency(spans)
    blocks = sum(a.num_blocks for a in cache.cache_allocators.values())
    row = {
        "tokens_per_s": sum(len(o.generated_tokens) for o in outs) / elapsed,
        "seconds": elapsed,
        "peak_concurrent": peak,
        "mean_concurrent": mean,
        "queued_concurrent": saturated,  # while requests still wait: what the budget holds, before the drain
        "unused_while_queued": _unused_while_queued(samples),
        # sequences of the longest kind the pages hold, each with its int4/int2 window (blocks of pages too)
        "capacity_seqs": blocks * PAGE / (512 + new_tokens + PAGE * _window_blocks(cache)),
        "ttft_p50_s": _percentiles(ttft)[0],
        "ttft_p99_s": _percentiles(ttft)[1],
        "tpot_p50_ms": 1e3 * _percentiles(tpot)[0],
        "tpot_p99_ms": 1e3 * _percentiles(tpot)[1],
        "kv_bytes": cache.kv_bytes,  # the int4/int2 windows live in its blocks
        "window_blocks": _window_blocks(cache),
        "kv_blocks": blocks,
    }
    manager.destroy()
    return row, [o.generated_tokens for o in outs]


def _agreement(kv: dict, prompts, budget: int) -> int:
    """Of AGREEMENT_REQUESTS x AGREEMENT_TOKENS float32 tokens, those equal to single-request generate before the
    first difference."""
    model = _model(kv, torch.float32, budget)
    sub = prompts[:AGREEMENT_REQUESTS]
    _, got = _run_cb(model, sub, AGREEMENT_TOKENS)
    model = _model({"dtype": "auto"}, torch.float32, budget)
    equal = 0
    for prompt, tokens in zip(sub, got, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=AGREEMENT_TOKENS, do_sample=False)[0, len(prompt) :]
        for a, b in zip(tokens, ref.tolist(), strict=False):
            if a != b:
                break
            equal += 1
    return equal


def run_one(name: str, requests: int, new_tokens: int, agreement: bool = True) -> dict:
    torch.set_num_threads(2)
    kv = ROWS[name]
    prompts = _prompts(requests)
    budget = _budget_bytes(new_tokens)
    model = _model(kv, torch.bfloat16, budget)
    row, _ = _run_cb(model, prompts, new_tokens)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["budget_bytes"] = budget
    del model
    if agreement:
        row["greedy_equal"] = _agreement(kv, prompts, budget)
    return {"name": name, **row}


def kv_quality(windows: int = 4, window: int = 2048) -> list[dict]:
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import perplexity, quantized_kv_attention, token_stream
    from hf_vram.kvcache.kivi import window_policy

    torch.set_num_threads(2)
    path = smollm2_path()
    ids = token_stream(AutoTokenizer.from_pretrained(path), pydoc_text(), windows * window)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = []
    long = replace(window_policy(4), sink_groups=1, lag_groups=1)  # kv_cache.sink_tokens: 64, recent_tokens: 64
    for kv, bits, policy in (
        ("bf16", None, None),
        ("int8", 8, None),
        ("int4", 4, None),
        ("int4, sink 64 + recent 64", 4, long),
        ("int2", 2, None),
    ):
        with quantized_kv_attention(model, bits, policy=policy):
            rows.append({"kv": kv, "ppl": perplexity(model, ids, window=window, batch_size=1)})
    return rows


def _rounds_note(rows: list[dict], bf16: dict | None) -> str:
    """With ``--repeat``: each row's ratios to bf16 K/V round by round (round 1 is the table's), so a ratio's
    run-to-run spread is in the table's text and not guessed."""
    if not bf16 or not bf16.get("repeats"):
        return ""
    base = [bf16, *bf16["repeats"]]

    def ratios(row: dict, key: str) -> str:
        runs = [row, *row.get("repeats", [])]
        return ", ".join(f"{run[key] / ref[key]:.2f}x" for run, ref in zip(runs, base, strict=False))

    parts = [
        f"{r['name'].removeprefix('continuous batching, ')}: tokens/s {ratios(r, 'tokens_per_s')}; mean concurrency "
        f"{ratios(r, 'mean_concurrent')}, while queued {ratios(r, 'queued_concurrent')}"
        for r in rows
        if r.get("repeats") and r is not bf16
    ]
    speeds = ", ".join(f"{run['tokens_per_s']:.1f}" for run in base)
    means = ", ".join(f"{run['mean_concurrent']:.2f}" for run in base)
    return (
        f"Rounds: every row ran {len(base)} times, once a round in the table's order (the table shows round 1); "
        f"against bf16 K/V in the same round, round by round: {'; '.join(parts)}. bf16 K/V's own: tokens/s "
        f"{speeds}, mean concurrency {means}."
    )


def _window_note(rows: list[dict]) -> str:
    """How a plain int4 window took its blocks in the run of ``rows`` (runs since the token cells record a fraction
    of a block as the window's largest)."""
    if any(r.get("window_blocks", 0) % 1 for r in rows):
        return (
            "a plain int4 window keeps its unfinished group's first tokens in the group's own page block, 34 of 64 "
            "here, and the rest in token cells, 34 to a block, that every request's window shares"
        )
    return (
        "since 5d8582b a plain int4 window holds a block of its own only while its unfinished group has more tokens "
        "than the group's page block hosts, 34 of 64 here"
    )


def tables(result: dict) -> list[str]:
    """The BENCHMARKS.md section of a batching run."""
    rows = result["rows"]
    for r in rows:
        if "error" not in r:
            r.setdefault("capacity_seqs", r["kv_blocks"] * 32 / (512 + result["new_tokens"]))  # rows of the 32-token pages
    bf16 = next((r for r in rows if r.get("name") == "continuous batching, bf16 KV" and "error" not in r), None)
    many = next((r for r in rows if r.get("name", "").startswith("hf_vram generate_many") and "error" not in r), None)
    agree_of = AGREEMENT_REQUESTS * AGREEMENT_TOKENS

    def ratio(row, base, key):
        return f"{row[key] / base[key]:.2f}x" if base and key in row and key in base else "-"

    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "-"

    rounds = _rounds_note(rows, bf16)
    lines = [
        "### Many requests, one KV budget: continuous batching (`benchmarks/batching.py`)",
        "",
        f"Run {result['date']} on {result['machine']}. {result['requests']} requests of 128-512 pydoc tokens, "
        f"{result['new_tokens']} new tokens, greedy, submitted at once; SmolLM2 with hf_vram int8 weights, bfloat16 "
        f"activations; one KV budget ({rows[0].get('budget_bytes', 0) / 2**20:.1f} MiB: {SEQUENCES_IN_BUDGET} "
        f"sequences of 640 tokens in bfloat16), pages of {PAGE} tokens. Every row a fresh process.",
        *([result["note"]] if result.get("note") else []),
        *([rounds] if rounds else []),
        "",
        "| engine, K/V | tokens/s | x CB bf16 | x generate_many | KV capacity (640-token seqs) | x bf16 "
        "| concurrent seqs peak / mean / while queued | x bf16 (mean / while queued) | TTFT p50 / p99 s "
        "| budget free while queued | TPOT p50 / p99 ms | peak RSS MiB "
        f"| greedy equal (of {agree_of}, fp32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 11)
            continue
        r.setdefault("capacity_seqs", r["kv_blocks"] * 32 / (512 + result["new_tokens"]))  # rows of the 32-token pages
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {ratio(r, bf16, 'tokens_per_s')} | "
            f"{ratio(r, many, 'tokens_per_s')} | {cell(r, 'capacity_seqs', '{:.1f}')} | "
            f"{ratio(r, bf16, 'capacity_seqs')} | {r['peak_concurrent']} / {cell(r, 'mean_concurrent', '{:.1f}')} / "
            f"{cell(r, 'queued_concurrent', '{:.1f}')} | "
            f"{ratio(r, bf16, 'mean_concurrent')} / {ratio(r, bf16, 'queued_concurrent')} | "
            f"{cell(r, 'ttft_p50_s', '{:.1f}')} / {cell(r, 'ttft_p99_s', '{:.1f}')} | "
            f"{cell(r, 'unused_while_queued', '{:.1%}')} | {cell(r, 'tpot_p50_ms', '{:.0f}')} / {cell(r, 'tpot_p99_ms', '{:.0f}')} | {r['peak_rss_mib']:.0f} | "
            f"{r['greedy_equal']} |"
        )
    quality = result.get("kv_quality") or []
    if isinstance(quality, list) and quality:
        base = next((q["ppl"] for q in quality if q["kv"] == "bf16"), None)
        lines += [
            "",
            "KV quality: perplexity over 4 pydoc windows of 2048 tokens, bfloat16 model, every token's attention reading "
            "the past as a decode step over the pages would (`quantized_kv_attention`: int8 per token; int4/int2 whole "
            "64-token groups quantized, keys per channel turned back to before RoPE and values per token (int4: turned by "
            "a Hadamard matrix, one symmetric scale a row), what the window holds in int8: the rest of the group, at int2 "
            "also the first group and the last 3 whole ones; 'sink 64 + recent 64': int4 with the first group and the "
            "last whole one too, `kv_cache.sink_tokens: 64, recent_tokens: 64`)"
            + (f", re-measured {result['quality_rerun']}" if result.get("quality_rerun") else "")
            + ":",
            "",
            "| K/V | ppl | vs bf16 K/V |",
            "|---|---|---|",
        ]
        lines += [f"| {q['kv']} | {q['ppl']:.3f} | {100 * (q['ppl'] / base - 1):+.2f}% |" for q in quality]
    lines += [
        "",
        "KV capacity: the blocks the budget holds, in sequences of the longest kind (512 + 128 tokens; int4/int2: each "
        f"with its window at its largest, which takes blocks of the same pool; {_window_note(rows)}). Concurrent "
        "sequences: requests holding K/V at once (Transformers' request lifespans; for generate_many, requests "
        "inside their generate call), the most, the time-weighted mean while any ran, and that mean while requests "
        "still waited to start (from the first start to the last: the budget full; the drain after it, a few "
        "sequences finishing, is a larger share of the run the more sequences a budget holds). Budget free while "
        "queued: the time-weighted share of the budget free (Transformers' `compute_free_capacity`, sampled at each "
        "scheduling) while requests waited: memory the budget has but no request uses yet, while the first prompts "
        "and those admitted after a wave of finishing requests are prefilled, and the scheduler's safety margin "
        "(Transformers' FIFO default: no new prompt below 15% free). TTFT: from submission to the first new token; TPOT: "
        "between a request's first and last new token (a request Transformers soft-resets, starved and prefilled "
        "again, is measured from its last reset: its lifespan, TTFT and TPOT are its last life's; its output still counts "
        "every token it generated). Greedy equal: for the first 16 requests, 32 new tokens in "
        "float32 through the same engine, the tokens equal to single-request `generate` before the first "
        "difference.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--only", default="")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds: every row once a round, in order; the table keeps the first, the note the spread of all",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-agreement", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agreement-only", action="store_true", help="re-measure only the greedy agreement of --only rows")
    parser.add_argument("--quality-only", action="store_true", help="re-measure only the K/V perplexity rows")
    parser.add_argument(
        "--no-quality",
        action="store_true",
        help="skip the K/V perplexity pass (keep the saved one): it runs in bfloat16, slow where bfloat16 matmuls are not native (AVX2)",
    )
    args = parser.parse_args()
    if args.quality_only:
        saved = json.loads(RESULTS.read_text())
        saved["kv_quality"] = kv_quality()
        saved["quality_rerun"] = time.strftime("%Y-%m-%d %H:%M")
        print(json.dumps(saved["kv_quality"]), flush=True)
        saved.pop("machine", None), saved.pop("versions", None)
        write_result(RESULTS, saved)
        return
    if args.agreement_only:
        saved = json.loads(RESULTS.read_text())
        for row in saved["rows"]:
            if row.get("name") in args.only.split(";") and row.get("name") in ROWS:
                torch.set_num_threads(2)
                budget = _budget_bytes(saved["new_tokens"])
                row["greedy_equal"] = _agreement(ROWS[row["name"]], _prompts(saved["requests"]), budget)
                row["greedy_equal_rerun"] = time.strftime("%Y-%m-%d %H:%M")
                print(row["name"], row["greedy_equal"], flush=True)
        saved.pop("machine", None), saved.pop("versions", None)
        write_result(RESULTS, saved)
        return
    from hf_vram.kernels import cpu_extension

    cpu_extension.load()  # built here if its source is newer than the build, never inside a timed row
    if args.one:
        emit(run_one(args.one, args.requests, args.new_tokens, agreement=not args.no_agreement))
        return
    if args.quality:
        emit({"rows": kv_quality()})
        return
    names = [n for n in ROWS if not args.only or n in args.only.split(";")]
    rows: dict[str, dict] = {}
    for round_ in range(args.repeat):
        for name in names:
            t0 = time.time()
            cmd = [__file__, "--one", name, "--requests", str(args.requests), "--new-tokens", str(args.new_tokens)]
            got = run_child(cmd + (["--no-agreement"] if round_ else []), fallback={"name": name}, env=child_env())
            print(f"{name} (round {round_ + 1}): {time.time() - t0:.0f}s {json.dumps(got)}", flush=True)
            if not round_:
                rows[name] = got
            elif "error" not in got and "error" not in rows[name]:
                rows[name].setdefault("repeats", []).append({key: got[key] for key in REPEATED})
    rows = merge_rerun(RESULTS, list(rows.values()))  # rows not re-measured (the retired engine's) stay
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "requests": args.requests, "new_tokens": args.new_tokens, "rows": rows}
    if args.no_quality:
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if "kv_quality" in saved:
            result["kv_quality"] = saved["kv_quality"]
    else:
        quality = run_child([__file__, "--quality"], env=child_env())
        print(json.dumps(quality), flush=True)
        result["kv_quality"] = quality.get("rows", quality)
    write_result(RESULTS, result)


if __name__ == "__main__":
    main()
