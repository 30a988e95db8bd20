"""KV-cache benchmark on SmolLM2-135M-Instruct (CPU): bytes against the ideal, token agreement, sharing, speed.

All rows in one process, one run: DynamicCache (Transformers' default), StaticCache, optimum-quanto's 4-bit
QuantizedCache (the peer), and hf_vram's pooled cache in float32 and int8. Writes
``benchmarks/results/kvcache.json``. Usage: ``python benchmarks/kvcache.py``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, results_path, versions  # noqa: E402

RESULTS = results_path("kvcache")
PROMPT_LENGTHS = (32, 128, 300, 500)
NEW_TOKENS = 128


def _cache_bytes(cache) -> int:
    """Every tensor storage reachable from the cache's layers (or its pool's used blocks), counted once."""
    from hf_vram.kvcache import PooledKVCache

    if isinstance(cache, PooledKVCache):
        return cache.pool.stats()["bytes_used"]
    seen, total = set(), 0

    def add(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor) and hasattr(obj, "__tensor_flatten__"):  # quanto's packed tensor subclasses
            for inner in obj.__tensor_flatten__()[0]:
                add(getattr(obj, inner), depth)
        elif isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                add(o, depth)
        elif hasattr(obj, "__dict__") and depth < 3 and not isinstance(obj, torch.nn.Module):
            for o in vars(obj).values():
                add(o, depth + 1)

    for layer in cache.layers:
        add(layer)
    return total


def _prompts(tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[5000 * i : 5000 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]


def _batch(prompts, pad_id):
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel() :] = p
        mask[row, width - p.numel() :] = 1
    return ids, mask


def _generate(model, ids, mask, new_tokens, **kwargs):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], out.cache


@torch.inference_mode()
def _teacher_forced_ppl(model, ids, make_cache, window=512, chunk=32) -> float:
    """Perplexity of 512-token windows fed 32 tokens at a time through a cache (the past is read from it)."""
    nll, count = 0.0, 0
    for w in ids.view(-1, window):
        cache = make_cache()
        for start in range(0, window, chunk):
            piece = w[None, start : start + chunk]
            logits = model(piece, cache=cache).logits[0].float()
            targets = w[start + 1 : start + chunk + 1]
            logits = logits[: targets.numel()]
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
        if hasattr(cache, "release"):
            cache.release()
    return math.exp(nll / count)


def _alloc_free_ns(num_blocks: int, pairs: int = 100_000) -> float:
    from hf_vram.kvcache.pool import KVCachePool, LayerShape

    pool = KVCachePool([LayerShape(1, 1)], num_blocks=num_blocks, block_size=16)
    held = pool.allocate(num_blocks // 2)  # a half-full pool
    t0 = time.perf_counter_ns()
    for _ in range(pairs):
        b = pool.allocate(1)
        pool.free(b)
    elapsed = (time.perf_counter_ns() - t0) / pairs
    pool.free(held)
    return elapsed


def _paired_decode(model, ids, mask, factories: dict, rounds: int = 5, new_tokens: int = 48) -> dict[str, float]:
    """Median decode tokens/s per cache, the caches alternating run by run so machine noise hits them alike."""
    from hf_vram.evaluation import decode_rate

    rates: dict[str, list[float]] = {name: [] for name in factories}
    for r in range(rounds + 1):
        for name, make in factories.items():
            cache = make()
            rate = decode_rate(model, ids, mask, new_tokens, cache=cache)
            if cache is not None:
                cache.release()
            if r:  # round 0 warms up
                rates[name].append(rate)
    return {name: statistics.median(v) for name, v in rates.items()}


def _speed(model, prompts) -> dict:
    from hf_vram.kvcache import KVCachePool, PooledKVCache

    one = prompts[1][None]
    batch8, mask8 = _batch([p for p in prompts for _ in range(2)], 0)
    speed = {}
    speed_pool = KVCachePool.for_model(model, num_blocks=512)
    factories = {"DynamicCache": lambda: None, "hf_vram pooled float32": lambda: PooledKVCache(speed_pool)}
    for label, (x, m) in {"batch 1": (one, torch.ones_like(one)), "batch 8 mixed": (batch8, mask8)}.items():
        speed[label] = _paired_decode(model, x, m, factories)
        print(label, json.dumps(speed[label]), flush=True)
    return speed


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import token_stream
    from hf_vram.kvcache import KVCachePool, PooledKVCache

    torch.set_num_threads(2)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = pydoc_text()
    prompts = _prompts(tok, text)
    ids, mask = _batch(prompts, 0)
    if "--speed-only" in sys.argv:  # re-measure the decode rows into the last full run's results
        result = json.loads(RESULTS.read_text())
        result["decode_tok_s"] = _speed(model, prompts)
        result["decode_remeasured"] = time.strftime("%Y-%m-%d %H:%M")
        RESULTS.write_text(json.dumps(result, indent=1))
        return
    pool = KVCachePool.for_model(model, num_blocks=256)
    pool8 = KVCachePool.for_model(model, num_blocks=256, dtype="int8")
    per_token = KVCachePool.bytes_per_block_for(pool.layers, 1, torch.float32)
    ideal = per_token * sum(p.numel() + NEW_TOKENS for p in prompts)
    result = {"machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "ideal_bytes": ideal}
    rows = []
    reference = None
    configs = {
        "DynamicCache": {},
        "StaticCache": {"cache": StaticCache(config=model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)},
        "quanto 4-bit QuantizedCache": {"cache_implementation": "quantized", "cache_config": {"backend": "quanto", "nbits": 4}},
        "hf_vram pooled float32": {"cache": PooledKVCache(pool)},
        "hf_vram pooled int8": {"cache": PooledKVCache(pool8)},
    }
    for name, kwargs in configs.items():
        try:
            t0 = time.perf_counter()
            new, cache = _generate(model, ids, mask, NEW_TOKENS, **kwargs)
            seconds = time.perf_counter() - t0
            # The cache holds prompt + new - 1 tokens; add the last token's share to compare with the ideal.
            stored = _cache_bytes(cache) + (len(prompts) * per_token if "pooled" in name else 0)
            if reference is None:
                reference = new
            same = [int((new[r] == reference[r]).long().cumprod(0).sum()) for r in range(len(prompts))]
            equal = [int((new[r] == reference[r]).sum()) for r in range(len(prompts))]
            row = {"name": name, "bytes": stored, "x_ideal": stored / ideal, "same_prefix": same, "equal": equal, "s": seconds}
            if hasattr(cache, "release"):
                row["fragmentation"] = cache.pool.stats()["fragmentation"]
                cache.release()
        except Exception as err:  # a peer that fails is a row
            row = {"name": name, "error": f"{type(err).__name__}: {err}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["rows"] = rows

    stream = token_stream(tok, text, 2048)
    ppl = {
        "DynamicCache": _teacher_forced_ppl(model, stream, lambda: DynamicCache(config=model.config)),
        "hf_vram pooled float32": _teacher_forced_ppl(model, stream, lambda: PooledKVCache(pool)),
        "hf_vram pooled int8": _teacher_forced_ppl(model, stream, lambda: PooledKVCache(pool8)),
    }
    result["teacher_forced_ppl"] = ppl
    print(json.dumps(ppl), flush=True)

    system = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:256]
    users = [token_stream(tok, text, 40000)[30000 + 100 * i : 30000 + 100 * i + 32] for i in range(8)]
    share_pool = KVCachePool.for_model(model, num_blocks=512)
    separate, caches = 0, []
    for user in users:
        prompt = torch.cat([system, user])[None]
        _, dyn = _generate(model, prompt, torch.ones_like(prompt), 16)
        separate += _cache_bytes(dyn)
        caches.append(PooledKVCache(share_pool))
        _generate(model, prompt, torch.ones_like(prompt), 16, cache=caches[-1])
    stats = share_pool.stats()
    result["shared_prefix"] = {
        "dynamic_bytes": separate,
        "pooled_bytes": stats["bytes_used"],
        "shared_blocks": stats["shared_blocks"],
    }
    for c in caches:
        c.release()
    print(json.dumps(result["shared_prefix"]), flush=True)

    result["alloc_free_ns"] = {str(n): _alloc_free_ns(n) for n in (1_000, 100_000)}
    print(json.dumps(result["alloc_free_ns"]), flush=True)

    result["decode_tok_s"] = _speed(model, prompts)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))


def tables(result: dict) -> list[str]:
    ideal = result["ideal_bytes"]
    lines = [
        "## KV cache on SmolLM2-135M-Instruct (`benchmarks/kvcache.py`, CPU)",
        "",
        f"Run {result['date']} on {result['machine']}. Batch of 4 prompts of {'/'.join(map(str, PROMPT_LENGTHS))} "
        f"tokens (left-padded), {NEW_TOKENS} greedy new tokens each; ideal float32 KV = {ideal / 2**20:.1f} MiB "
        "(every real token once, nothing else).",
        "",
        "| cache | MiB | × ideal | greedy tokens equal to DynamicCache's (per sequence, of 128) | first divergence |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['x_ideal']:.2f} | {' / '.join(map(str, r['equal']))} | "
            f"{' / '.join(map(str, r['same_prefix']))} |"
        )
    ppl = result["teacher_forced_ppl"]
    base = ppl["DynamicCache"]
    sp = result["shared_prefix"]
    lines += [
        "",
        "Teacher-forced perplexity (2,048 pydoc tokens, 512-token windows fed 32 tokens at a time, so the past is read "
        "from the cache): " + ", ".join(f"{k} {v:.3f} ({100 * (v / base - 1):+.2f}%)" for k, v in ppl.items()) + ".",
        "",
        f"8 requests sharing a 256-token system prompt (+32 own tokens, 16 new each): 8 DynamicCaches hold "
        f"{sp['dynamic_bytes'] / 2**20:.1f} MiB, one pool {sp['pooled_bytes'] / 2**20:.1f} MiB "
        f"({sp['shared_blocks']} shared blocks of 16 tokens).",
        "",
        "Allocate + free of one block, mean of 100,000 pairs on a half-full pool: "
        + ", ".join(f"{int(k):,} blocks {v:.0f} ns" for k, v in result["alloc_free_ns"].items())
        + ".",
        "",
        "Decode tokens/s (greedy, 48 new tokens, prefill excluded; median of 5 runs, the two caches alternating"
        + (
            f"; re-measured {result['decode_remeasured']} after a gather change, same machine"
            if "decode_remeasured" in result
            else ""
        )
        + "):",
        "",
        "| batch | DynamicCache | hf_vram pooled | ratio |",
        "|---|---|---|---|",
    ]
    for label, s in result["decode_tok_s"].items():
        d, p = s["DynamicCache"], s["hf_vram pooled float32"]
        lines.append(f"| {label} | {d:.1f} | {p:.1f} | {p / d:.2f}× |")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
