"""Serve many requests on one pooled KV cache: int8 weights, a shared system prompt stored once, 4 worker threads.

``hf_vram.generate_many`` admits requests while the pool has room (worst-case reservation), shares the KV blocks of
a common prompt prefix between requests, and gives every block back when a request ends or is cancelled. The pool
is sized by bytes; its statistics show what the requests really used.
Run: python examples/serve_many.py [--requests 12] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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
    parser.add_argument("--pool", default="24MiB", help="KV pool size (bytes or e.g. 24MiB)")
    args = parser.parse_args()

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"})
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    pool = hf_vram.KVCachePool.for_model(model, max_memory=args.pool, dtype="int8")

    system = "You are a concise Python tutor. Answer in one or two sentences, with a short example when it helps."
    prompts = []
    for i in range(args.requests):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        prompts.append(ids if isinstance(ids, torch.Tensor) else ids["input_ids"])

    start = time.perf_counter()
    outputs = hf_vram.generate_many(model, prompts, pool, max_new_tokens=args.new_tokens, workers=4, do_sample=False)
    seconds = time.perf_counter() - start
    for i, out in enumerate(outputs[:3]):
        print(f"[{i}] {QUESTIONS[i % len(QUESTIONS)]} -> {tokenizer.decode(out, skip_special_tokens=True)!r}")
    stats = pool.stats()
    new_tokens = sum(o.numel() for o in outputs if o is not None)
    print(f"{args.requests} requests, {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tok/s)")
    print(
        f"pool: {stats['bytes_reserved'] / 2**20:.1f} MiB reserved, high water {stats['high_water_blocks']} blocks, "
        f"{stats['blocks_used']} blocks still used after the run"
    )
    if stats["blocks_used"]:
        raise SystemExit("hf_vram: blocks leaked")


if __name__ == "__main__":
    main()
