"""Chunked prefill on SmolLM2 in float32: the same answer as one whole prefill, in a fraction of the memory, and
what ``hf_vram.estimate`` predicts for it.

Three engines: SmolLM2 as Transformers loads it (SDPA attention, which repeats K/V for grouped-query heads whenever
it is given a mask, as every chunk after the first is), with hf_vram's attention only (``fusion.attention:
hf_vram``: K/V never expanded, the chunk's mask built whole only while small), both over ``DynamicCache``; and
hf_vram's attention over hf_vram's pool (``kv_cache.enabled``, float32 blocks of 16: each chunk written straight
into blocks, its history read from the pool a segment at a time, every full block hashed for sharing; K/V = the
pool's blocks at their most); and that pool with a device tier of 2048 tokens and the rest in host memory
(``kv_cache.offload_memory``: the oldest full blocks move there, the history reader brings them back a segment at a
time; 8192 tokens only, held to the roomy pool's unchunked row; K/V = the device tier's, the host's beside it). For
2048 and 8192 pydoc tokens and chunks of {512, 2048, none} (Transformers'
``prefill_chunk_size``, passed to ``generate`` as users pass it), each in a fresh process:
- the prefill's peak memory as the kernel counts it: ``VmHWM`` (peak RSS) reset through ``/proc/self/clear_refs``
  just before ``generate`` (after a 16-token forward has paged the memory-mapped weights in), minus the RSS then; and that peak less the K/V the cache holds at the end (the
  transient part, what chunking is for);
- the first new token's logits against the unchunked run's (max abs difference) and the 16 greedy tokens;
- the activation peak three ways: ``hf_vram.estimate`` (shapes only), ``measure_activations`` (the CPU storage
  tracker on a real prefill; for the pool rows, on the pool's own prefill) and the RSS transient above, all without the K/V.

Usage: ``python benchmarks/prefill.py [--only 'transformers 8192/512;hf_vram attention 8192/512']`` (the unchunked row
of each length always runs: it is the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import child_env, emit, merge_rerun, results_path, run_child, write_result  # noqa: E402

RESULTS = results_path("prefill")
FUSED = {"enabled": True, "norms": False, "projections": False}
POOL = {"enabled": True, "block_size": 16, "num_blocks": 8192 // 16 + 8}  # float32 blocks, touched as written
OFFLOAD = {**POOL, "num_blocks": 2048 // 16 + 8, "offload_memory": "300MiB"}  # a device tier of 2048 tokens
ENGINES = {
    "transformers": {},
    "hf_vram attention": {"fusion": FUSED},
    "hf_vram attention + pool": {"fusion": FUSED, "kv_cache": POOL},
    "hf_vram attention + pool, offload": {"fusion": FUSED, "kv_cache": OFFLOAD},
}
REFERENCE = {"hf_vram attention + pool, offload": "hf_vram attention + pool"}  # whose unchunked row it is held to
ENGINE_LENGTHS = {"hf_vram attention + pool, offload": (8192,)}
LENGTHS = (2048, 8192)
CHUNKS = (None, 2048, 512)
NEW_TOKENS = 16


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one(engine: str, length: int, chunk: int | None, logits_path: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_vram
    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import token_stream
    from hf_vram.kvcache.attach import POOL_ATTR

    torch.set_num_threads(2)
    config = ENGINES[engine]
    kwargs = {"quantization_config": hf_vram.VramOptimizationConfig(**config)} if config else {}
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32, **kwargs).eval()
    ids = token_stream(AutoTokenizer.from_pretrained(smollm2_path()), pydoc_text(), length)[None]
    with torch.inference_mode():
        model(ids[:, :16])  # pages the memory-mapped weights in: they are not the prefill's memory
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            prefill_chunk_size=chunk,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - t0
        peak = (_status_kib("VmHWM") - before) * 1024
    cache = out.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    pool = getattr(model, POOL_ATTR, None)
    host_kv = None
    if pool is not None:  # the pool's blocks at their most (the cache gave them back when generate returned)
        kv = min(pool.high_water, pool.num_blocks - 1) * pool.bytes_per_block  # the device tier's
        host_kv = max(0, pool.high_water - (pool.num_blocks - 1)) * pool.bytes_per_block if pool.offload_blocks else None
    torch.save(out.logits[0][0].clone(), logits_path)
    tokens = out.sequences[0, length:].tolist()
    del out, cache
    if pool is None:
        measured = hf_vram.planner.measure_activations(model, ids, prefill_chunk=chunk)
    else:  # the pool's own path (its blocks were allocated before: they are not the prefill's)
        with torch.inference_mode(), hf_vram.track_peak_memory() as tracked:
            model.generate(ids, max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0)
        measured = tracked.peak_bytes
    estimated = hf_vram.estimate(smollm2_path(), config, seq_len=length, prefill_chunk=chunk, dtype="float32")
    return {
        "seconds": seconds,
        "rss_peak": peak,
        "kv_bytes": kv,
        "rss_transient": peak - kv - (host_kv or 0),  # on a CPU the host tier is in the RSS too
        "tracker": measured,
        "estimate": estimated.activation_bytes,
        "tokens": tokens,
        **({"host_kv_bytes": host_kv} if host_kv is not None else {}),
    }


def _name(engine: str, length: int, chunk: int | None) -> str:
    return f"{engine} {length}/{chunk or 'none'}"


def _parse(name: str) -> tuple[str, int, int | None]:
    engine, shape = name.rsplit(" ", 1)
    length, chunk = shape.split("/")
    return engine, int(length), None if chunk == "none" else int(chunk)


def tables(result: dict) -> list[str]:
    rows = {r["name"]: r for r in result["rows"]}
    lines = [
        "### Chunked prefill: the same answer in less memory, and the estimate (`benchmarks/prefill.py`)",
        "",
        f"Run {result['date']} on {result['machine']}. SmolLM2-135M-Instruct in float32, Transformers' "
        f"`generate(prefill_chunk_size=...)` over `DynamicCache` (the pool rows: hf_vram's pool), pydoc text, {NEW_TOKENS} greedy tokens; each row a "
        "fresh process. Peak: `VmHWM` reset just before `generate`, minus the RSS then; transient: that peak less the "
        "K/V the cache holds at the end. Logits: the first new token's, against the unchunked run of the same "
        "length. Activations: `hf_vram.estimate`, the storage tracker (`measure_activations`) and the RSS transient, "
        "K/V excluded from all three." + (f" {result['note']}" if result.get("note") else ""),
        "",
        "| engine tokens / chunk | peak MiB | K/V MiB | transient MiB | transient x unchunked | max abs logit diff | "
        "same tokens | estimate MiB | tracker MiB | estimate / tracker | estimate / RSS transient | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:120]} |" + " |" * 11)
            continue
        engine, length, _ = _parse(r["name"])
        base = rows.get(_name(REFERENCE.get(engine, engine), length, None))
        kv = f"{r['kv_bytes'] / mib:.0f}" + (f" (+{r['host_kv_bytes'] / mib:.0f} host)" if "host_kv_bytes" in r else "")
        ratio = f"{r['rss_transient'] / base['rss_transient']:.2f}" if base and "error" not in base else "-"
        lines.append(
            f"| {r['name']} | {r['rss_peak'] / mib:.0f} | {kv} | {r['rss_transient'] / mib:.0f} | "
            f"{ratio} | {r['logit_diff']:.1e} | {r['same_tokens']} | {r['estimate'] / mib:.0f} | "
            f"{r['tracker'] / mib:.0f} | {r['estimate'] / r['tracker']:.2f} | {r['estimate'] / r['rss_transient']:.2f} | "
            f"{r['seconds']:.0f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit({"name": args.one, **run_one(*_parse(args.one), args.logits)})
        return
    rows = []
    logits_at: dict[str, str] = {}  # each row's first-token logits, saved by its process
    with tempfile.TemporaryDirectory() as tmp:
        wanted = args.only.split(";") if args.only else []
        for engine, length in [(e, n) for e in ENGINES for n in ENGINE_LENGTHS.get(e, LENGTHS)]:
            if wanted and not any(w.startswith(f"{engine} {length}/") for w in wanted):
                continue
            base, base_logits = None, None
            for chunk in CHUNKS:
                name = _name(REFERENCE.get(engine, engine) if chunk is None else engine, length, chunk)
                done = next((r for r in rows if r["name"] == name), None)
                if chunk is None and done is not None and name in logits_at:  # another engine's reference, run already
                    base, base_logits = done, torch.load(logits_at[name])
                    continue
                if (wanted and name not in wanted and chunk is not None) or done is not None:
                    continue
                path = str(Path(tmp) / f"{len(rows)}.pt")
                env = child_env()
                row = run_child([__file__, "--one", name, "--logits", path], fallback={"name": name}, env=env)
                if "error" not in row:
                    logits_at[name] = path
                    logits = torch.load(path)
                    if chunk is None:
                        base, base_logits = row, logits
                    if base is not None:
                        row["logit_diff"] = (logits - base_logits).abs().max().item()
                        row["same_tokens"] = row["tokens"] == base["tokens"]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    write_result(RESULTS, {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": merge_rerun(RESULTS, rows)})


if __name__ == "__main__":
    main()
