"""Many threads, random cancellations, one pool: exactly the sequential results, and no block left behind.

Also the soak: thousands of short requests through one pool with flat memory (pool high water and process peak
RSS compared between the first and the last window of requests).
"""

from __future__ import annotations

import random
import resource
import threading

import torch

import hf_vram
from hf_vram.kvcache import KVCachePool
from tests.tiny_models import build_tiny


def _prompts(n: int, seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [torch.tensor([rng.randrange(3, 300) for _ in range(rng.randrange(2, 14))]) for _ in range(n)]


def test_eight_threads_with_random_cancellations_match_sequential_and_leak_nothing():
    model = build_tiny("llama").eval()
    pool = KVCachePool.for_model(model, num_blocks=20, block_size=4)  # too small for all at once: requests wait
    for round_ in range(4):
        prompts = _prompts(12, seed=round_)
        sequential = [model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, p.numel() :] for p in prompts]
        rng = random.Random(100 + round_)
        cancel = {i: threading.Event() for i in rng.sample(range(12), 5)}
        timers = [threading.Timer(rng.uniform(0.0, 0.05), event.set) for event in cancel.values()]
        for t in timers:
            t.start()
        outs = hf_vram.generate_many(
            model, prompts, pool, max_new_tokens=8, workers=8, cancel=cancel, do_sample=False, pad_token_id=0
        )
        for t in timers:
            t.join()
        for i, (out, ref) in enumerate(zip(outs, sequential, strict=True)):
            if i not in cancel:
                assert out is not None and torch.equal(out, ref), (round_, i)
            else:  # cancelled before, during or after its run: nothing, or exactly its complete result
                assert out is None or torch.equal(out, ref), (round_, i)
        assert pool.stats()["blocks_used"] == 0, round_
        pool.check_invariants([])


def test_soak_many_short_requests_keep_memory_flat():
    model = build_tiny("qwen2").eval()
    pool = KVCachePool.for_model(model, num_blocks=64, block_size=4)
    windows = []
    total = 0
    for window in range(5):
        pool.high_water = pool.stats()["blocks_used"]
        prompts = _prompts(400, seed=1000 + window)
        outs = hf_vram.generate_many(model, prompts, pool, max_new_tokens=2, workers=4, do_sample=False, pad_token_id=0)
        assert all(o is not None and o.numel() == 2 for o in outs)
        total += len(prompts)
        windows.append((pool.stats()["high_water_blocks"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
        assert pool.stats()["blocks_used"] == 0
    print(
        f"soak: {total} requests; pool high water per window {[w[0] for w in windows]} blocks; "
        f"peak RSS {windows[0][1] // 1024} -> {windows[-1][1] // 1024} MiB"
    )
    assert total == 2000
    assert max(w[0] for w in windows[1:]) <= windows[0][0] + 4  # the same traffic needs the same blocks
    assert windows[-1][1] - windows[1][1] < 64 * 1024  # peak RSS (KiB) grows by less than 64 MiB after warm-up
