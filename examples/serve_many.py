"""Serve many requests at once: int8 weights and int8 K/V pages inside Transformers' continuous batching.

``model.generate_batch`` packs every live request into one forward per step (continuous batching), over a paged
cache whose pages hold hf_vram's int8 K/V (``kv_cache.dtype: int8``): about twice the sequences of bfloat16 K/V in
the same bytes (``kv_cache.max_memory``). A shared system prompt is stored once (prefix sharing), and every page goes
back when a request ends.
Run: python examples/serve_many.py [--requests 12] [--new-tokens 24] [--kv-memory 24MiB]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import hf_vram
from hf_vram.assets import smollm2_path

QUESTIONS = [
    "What is a generator?",
    "How do I sort a dict by value?",
    "Explain *args.",
    "What does `with` do?",
    "What is a decorator?",
    "How do I read a file?",
    "What is a lambda?",
    "Explain list comprehensions.",
    "What is `__init__`?",
    "How do exceptions work?",
    "What is a set?",
    "Explain `yield from`.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--kv-memory", default="24MiB", help="KV budget (bytes or e.g. 24MiB)")
    args = parser.parse_args()

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = hf_vram.VramOptimizationConfig(
        quantization={"scheme": "int8"}, kv_cache={"dtype": "int8", "enabled": False, "max_memory": args.kv_memory}
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16).eval()

    system = "You are a concise Python tutor. Answer in one or two sentences, with a short example when it helps."
    prompts = []
    for i in range(args.requests):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        prompts.append(ids[0].tolist())

    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    manager = model.init_continuous_batching(generation_config=generation)  # what generate_batch runs, kept open
    manager.start()
    start = time.perf_counter()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=args.new_tokens)
    results = {}
    while len(results) < len(ids):
        out = manager.get_result(timeout=10)
        if out is None and not manager.is_running():
            raise SystemExit("hf_vram: the batching loop stopped before every request finished")
        if out is not None and out.is_finished():
            results[out.request_id] = out
    seconds = time.perf_counter() - start
    cache = manager.batch_processor.cache
    manager.stop(block=True, timeout=60)
    if manager.is_running():
        raise SystemExit("hf_vram: the batching loop did not stop within 60 s of the last request")
    pages = sum(a.num_blocks for a in cache.cache_allocators.values())
    cache.evict_cached_blocks()  # pages kept for prefix reuse are not held by any request: give them back too
    free = sum(cache.pool.count_free_blocks(a.index) for a in cache.cache_allocators.values())
    free += cache.pool.num_free_sectors * max(a.blocks_per_sector for a in cache.cache_allocators.values())
    in_use = pages - free
    manager.destroy()
    outputs = [results[i] for i in ids]
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise SystemExit(f"hf_vram: {len(failed)} request(s) failed: {failed[0]}")
    for i, out in enumerate(outputs[:3]):
        print(f"[{i}] {QUESTIONS[i % len(QUESTIONS)]} -> {tokenizer.decode(out.generated_tokens, skip_special_tokens=True)!r}")
    new_tokens = sum(len(o.generated_tokens) for o in outputs)
    print(f"{args.requests} requests, {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tok/s)")
    print(
        f"KV: {cache.kv_bits}-bit pages, {pages} blocks in {cache.kv_bytes / 2**20:.1f} MiB; {in_use} blocks still used after the run"
    )
    if in_use:
        raise SystemExit("hf_vram: KV pages leaked")


if __name__ == "__main__":
    main()
