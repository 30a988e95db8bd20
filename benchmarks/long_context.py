"""Long context in little memory: K/V bytes and quality at 8k tokens on SmolLM2, hf_vram's quantized pages beside
Transformers' ``QuantizedCache``.

Rows (each in a fresh process): bf16 K/V, hf_vram int8 / int4 / int2 pages (continuous batching, ``generate_batch``),
and Transformers' ``QuantizedCache`` with the quanto and HQQ backends at 4 and 2 bits (``generate``; its defaults:
residual 128 tokens, groups of 64). SmolLM2-135M-Instruct in bfloat16, weights not quantized (the K/V alone).
Columns:
- K/V bytes per token of context at 8192 tokens, every layer, scales and full-precision window included (the
  window counted whole for one request; QuantizedCache, nominal: its codes, a bfloat16 scale and zero per 64 values, and its
  128-token residual).
- Perplexity over two 8192-token pydoc windows, every token's attention reading the past as the decode step over the
  pages would (``hf_vram.evaluation.quantized_kv_attention``); QuantizedCache has no such reading (it re-quantizes
  its whole past every 128 tokens), so '-' there.
- Passkey: a five-digit number hidden at a depth in pydoc text, asked for at the end, greedy answer; lengths
  {1024, 2048, 4096, 8000} tokens x 10 depths (0.05 .. 0.95) = 40 prompts, the same for every row. The prompt is
  prefilled as computed and the answer's decode steps read the quantized past, in both engines.

Usage: ``python benchmarks/long_context.py [--only 'row;row']`` (a row took about 25 minutes on this shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_env, emit, merge_rerun, results_path, run_child, write_result  # noqa: E402

RESULTS = results_path("long_context")
CONTEXT = 8192
PAGE = 64
LENGTHS = (1024, 2048, 4096, 8000)
DEPTHS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
ANSWER_TOKENS = 8
LONG_WINDOW = {"sink_tokens": 64, "recent_tokens": 64}  # int4's window for long contexts (``kivi.WindowPolicy``)
READ_BACK = "int8_layers_by_readback"  # a row's setting: this many int8 layers, chosen on CALIBRATION_TOKENS
READ_BACK_INT4 = "int4_layers_by_readback"  # the same for int4 layers in int2 pages
CALIBRATION_TOKENS = (2 * CONTEXT, 2 * CONTEXT + 2048)  # pydoc tokens past the two perplexity windows
ROWS = {  # name -> (engine, kv dtype or QuantizedCache backend, bits[, the kv_cache section's other settings])
    "bf16 K/V": ("hf_vram", "auto", 16),
    "hf_vram int8 pages": ("hf_vram", "int8", 8),
    "hf_vram int4 pages": ("hf_vram", "int4", 4),
    "hf_vram int4 pages, sink 64 + recent 64": ("hf_vram", "int4", 4, LONG_WINDOW),
    "hf_vram int2 pages": ("hf_vram", "int2", 2),
    # int4 pages always hold values turned (``kivi.WindowedKVCodec``'s one scale a value row); at int2 it is a setting
    "hf_vram int4 pages, 2 int8 layers, sink 64 + recent 64": ("hf_vram", "int4", 4, {**LONG_WINDOW, READ_BACK: 2}),
    "hf_vram int4 pages, 2 int8 layers": ("hf_vram", "int4", 4, {READ_BACK: 2}),
    "hf_vram int4 pages, 1 int8 layer": ("hf_vram", "int4", 4, {READ_BACK: 1}),
    "hf_vram int2 pages, 2 lagging groups, values turned, 1 int4 layer": (
        "hf_vram",
        "int2",
        2,
        {"recent_tokens": 128, "rotate_values": True, READ_BACK_INT4: 1},
    ),
    "QuantizedCache quanto int4": ("quantized", "quanto", 4),
    "QuantizedCache quanto int2": ("quantized", "quanto", 2),
    "QuantizedCache HQQ int4": ("quantized", "hqq", 4),
    "QuantizedCache HQQ int2": ("quantized", "hqq", 2),
}
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer) -> list[tuple[list[int], int]]:
    """(prompt ids, key) for every length x depth: pydoc filler with the needle at the depth, the question last."""
    from hf_vram.assets import pydoc_text

    filler = tokenizer(pydoc_text(), add_special_tokens=False).input_ids
    intro = tokenizer("There is a pass key hidden in this text. Find it and remember it.\n").input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    rng = random.Random(0)
    prompts = []
    for length in LENGTHS:
        for depth in DEPTHS:
            key = rng.randint(10000, 99999)
            needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
            body = length - len(intro) - len(needle) - len(question)
            start = rng.randint(0, len(filler) - body)
            text = filler[start : start + body]
            at = int(depth * body)
            prompts.append((intro + text[:at] + needle + text[at:] + question, key))
    return prompts


def kv_bytes_per_token(kind: str, bits: int, kv: dict | None = None) -> float:
    """K/V bytes per token of an 8192-token context, every layer (see the module docstring); ``kv``: the kv_cache
    section's window settings."""
    from transformers import AutoConfig
    from transformers.generation.continuous_batching.utils import find_head_dim

    import hf_vram
    from hf_vram.assets import smollm2_path
    from hf_vram.kvcache.continuous import window_tokens
    from hf_vram.kvcache.layer_widths import slot_count
    from hf_vram.kvcache.paged_allocator import quantized_allocator

    c = AutoConfig.from_pretrained(smollm2_path())
    if kv:
        c.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": f"int{bits}", **kv})
    heads, head_dim, layers = c.num_key_value_heads, find_head_dim(c), c.num_hidden_layers
    bf16 = 2 * heads * head_dim * 2
    if bits == 16:
        return layers * bf16
    if kind == "hf_vram":  # the window: whole pages of the pool (page size 64, as run here); int8 layers' pages
        window = window_tokens(c, f"int{bits}", PAGE) / CONTEXT
        return slot_count(c, bits) * quantized_allocator(bits).bytes_per_token(c, heads) * (1 + window)
    residual = 128 * bf16 / CONTEXT
    return layers * (2 * heads * head_dim * (bits / 8 + 2 * 2 / 64) + residual)  # a bf16 scale and zero per 64 values


def _model(kv: str, settings: dict | None = None):
    from transformers import AutoModelForCausalLM

    import hf_vram
    from hf_vram.assets import smollm2_path

    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": kv, "enabled": False, **(settings or {})})
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=config, dtype=torch.bfloat16).eval()


def choose_wide_layers(tokenizer, bits: int, settings: dict, count: int) -> list[int]:
    """``count`` layers for ``kv_cache.int8_layers`` (``int4_layers``): those whose ``bits``-bit K/V (the row's rounding) lose most on
    ``CALIBRATION_TOKENS`` of pydoc text (``int8_layers_by_readback``)."""
    from hf_vram.assets import pydoc_text
    from hf_vram.evaluation import token_stream
    from hf_vram.kvcache.readback import int8_layers_by_readback

    ids = token_stream(tokenizer, pydoc_text(), CALIBRATION_TOKENS[1])[CALIBRATION_TOKENS[0] :]
    return int8_layers_by_readback(_model(f"int{bits}", settings), ids, count, bits)


def _answers_batched(model, prompts) -> list[list[int]]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=PAGE, num_blocks=4 * CONTEXT // PAGE, max_batch_tokens=2048)
    out = model.generate_batch([p for p, _ in prompts], generation_config=gen, continuous_batching_config=cb)
    return [o.generated_tokens for o in out.values()]


def _answers_quantized_cache(model, prompts, backend: str, bits: int) -> list[list[int]]:
    answers = []
    for ids, _ in prompts:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=ANSWER_TOKENS,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="quantized",
            cache_config={"backend": backend, "nbits": bits},
        )
        answers.append(out[0, len(ids) :].tolist())
    return answers


def run_one(name: str) -> dict:
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import perplexity, quantized_kv_attention, token_stream

    torch.set_num_threads(2)
    engine, kind, bits, *settings = ROWS[name]
    settings = dict(settings[0]) if settings else None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    prompts = passkey_prompts(tokenizer)
    t0 = time.perf_counter()
    row = {}
    for key, field in ((READ_BACK, "int8_layers"), (READ_BACK_INT4, "int4_layers")):
        if settings and key in settings:  # chosen here, on text the rows do not score
            count = settings.pop(key)
            settings[field] = row[field] = choose_wide_layers(tokenizer, bits, settings, count)
    row["bytes_per_token"] = kv_bytes_per_token(engine, bits, settings)
    with torch.inference_mode():
        if engine == "hf_vram":
            model = _model(kind, settings)
            answers = _answers_batched(model, prompts)
            ids = token_stream(tokenizer, pydoc_text(), 2 * CONTEXT)
            with quantized_kv_attention(model, bits if bits < 16 else None):
                row["ppl"] = perplexity(model, ids, window=CONTEXT, batch_size=1)
        else:
            answers = _answers_quantized_cache(_model("auto"), prompts, kind, bits)
    row["seconds"] = time.perf_counter() - t0
    found = [str(key) in tokenizer.decode(a) for a, (_, key) in zip(answers, prompts, strict=True)]
    row["passkey"] = sum(found) / len(found)
    row["found"] = "".join("x" if f else "." for f in found)  # per prompt, lengths x depths in order
    row["passkey_by_length"] = {
        str(n): sum(found[i * len(DEPTHS) : (i + 1) * len(DEPTHS)]) / len(DEPTHS) for i, n in enumerate(LENGTHS)
    }
    return {"name": name, **row}


def tables(result: dict) -> list[str]:
    rows = result["rows"]
    base = next((r for r in rows if r["name"] == "bf16 K/V" and "error" not in r), None)

    def rel(r, key, fmt):
        if key not in r:
            return "-"
        if base is None or key not in base:
            return fmt.format(r[key])
        return fmt.format(r[key]) + (f" ({100 * (r[key] / base[key] - 1):+.2f}%)" if key == "ppl" else "")

    lines = [
        "### Long context: K/V bytes and quality at 8k tokens (`benchmarks/long_context.py`)",
        "",
        f"Run {result['date']} on {result['machine']}. SmolLM2-135M-Instruct, bfloat16, weights not quantized. "
        "Bytes: K/V per token of an 8192-token context, all 30 layers, scales and full-precision window included. "
        "Perplexity: two 8192-token pydoc windows, each token's attention reading the past as a decode step over the "
        "pages would. Passkey: 40 prompts (lengths 1024/2048/4096/8000 x 10 depths), a five-digit key in pydoc text, "
        "greedy answer." + (f" {result['note']}." if result.get("note") else ""),
        "",
        "| K/V | bytes/token | x bf16 | ppl (8k) | passkey | by length 1k / 2k / 4k / 8k | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | |")
            continue
        ratio = f"{r['bytes_per_token'] / base['bytes_per_token']:.3f}" if base else "-"
        by_length = " / ".join(f"{v:.1f}" for v in r["passkey_by_length"].values())
        wide = r.get("int8_layers") or r.get("int4_layers")
        name = r["name"] + (f" (layers {', '.join(map(str, wide))})" if wide else "")
        lines.append(
            f"| {name} | {r['bytes_per_token']:.0f} | {ratio} | {rel(r, 'ppl', '{:.3f}')} | {r['passkey']:.3f} "
            f"| {by_length} | {r['seconds']:.0f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(args.one))
        return
    rows = []
    for name in [n for n in ROWS if not args.only or n in args.only.split(";")]:
        t0 = time.time()
        rows.append(run_child([__file__, "--one", name], fallback={"name": name}, env=child_env()))
        print(f"{name}: {time.time() - t0:.0f}s {json.dumps(rows[-1])}", flush=True)
    write_result(RESULTS, {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": merge_rerun(RESULTS, rows)})


if __name__ == "__main__":
    main()
