"""Many requests, random cancellations, one paged cache (Transformers' continuous batching over hf_vram's int8 K/V
pages): every request that is not cancelled gets exactly its tokens, and no block is left behind.

Also the soak (seconds long here; the long load runs live in benchmarks/): thousands of short requests through one
manager with flat memory (the cache's free sectors back to full after every window, process peak RSS compared
between the second and the last window).
"""

from __future__ import annotations

import random
import resource
import time

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import hf_vram
from tests.tiny_models import build_tiny


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 14))] for _ in range(n)]


def _model(arch: str, kv: str):
    return hf_vram.optimize(
        build_tiny(arch).float().eval(), {"quantization": {"scheme": "int8"}, "kv_cache": {"dtype": kv, "enabled": False}}
    )


def _manager(model, new_tokens: int, num_blocks: int):
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=4, max_batch_tokens=64)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.warmup()
    return manager


def _drain(manager, ids: set[str], deadline_s: float = 120.0) -> dict:
    results, end = {}, time.monotonic() + deadline_s
    while not ids <= set(results) and time.monotonic() < end:
        out = manager.get_result(timeout=0.5)
        if out is not None and out.is_finished():
            results[out.request_id] = out
    return results


def _stop(manager) -> None:
    """Stop the loop, bounded: a loop still running a minute after every request ended holds a request it should
    not (a cancelled one left pending, say); that fails the test with what was pending instead of hanging the run."""
    pending = manager.batch_processor.has_pending_requests() if manager.batch_processor is not None else None
    manager.stop(block=True, timeout=60)
    if manager.is_running():
        manager.stop(block=True, timeout=10, hard_stop=True)
        raise AssertionError(f"the batching loop did not stop within 60 s (pending requests: {pending})")
    manager.destroy()


def _all_blocks_free(manager) -> bool:
    """No request holds a page, and once the pages kept for prefix reuse are evicted every block is free: in the
    sectors the allocator holds, or in the sectors still unassigned."""
    cache = manager.batch_processor.cache
    with manager.pause():
        allocators = list(cache.cache_allocators.values())
        held = any(a.block_table or a.ledger.shared_ref_counts for a in allocators)
        cache.evict_cached_blocks()
        free = cache.pool.num_free_sectors
        return not held and all(
            cache.pool.count_free_blocks(a.index) + free * a.blocks_per_sector == a.num_blocks for a in allocators
        )


def test_random_cancellations_leave_the_others_exact_and_no_block_behind():
    model = _model("llama", "auto")  # float pages: exact against single-request generate
    manager = _manager(model, new_tokens=8, num_blocks=6)  # too small for all at once: requests wait their turn
    manager.start()
    try:
        for round_ in range(3):
            prompts = _prompts(12, seed=round_)
            sequential = [
                model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
                for p in prompts
            ]
            ids = manager.add_requests(inputs=prompts, max_new_tokens=8)
            rng = random.Random(100 + round_)
            cancelled = set(rng.sample(ids, 5))
            for request_id in cancelled:
                time.sleep(rng.uniform(0.0, 0.02))
                manager.cancel_request(request_id)
            results = _drain(manager, set(ids) - cancelled)
            for request_id, ref in zip(ids, sequential, strict=True):
                if request_id not in cancelled:
                    assert results[request_id].error is None and results[request_id].generated_tokens == ref
                elif request_id in results and results[request_id].error is None:  # finished before its cancel
                    assert results[request_id].generated_tokens in (ref, ref[: len(results[request_id].generated_tokens)])
            _drain(manager, set(), deadline_s=0.5)
        assert _all_blocks_free(manager)
    finally:
        _stop(manager)


def test_a_scheduler_left_blocking_with_nothing_running_takes_new_requests():
    """The state a cancellation after an offload leaves in Transformers 5.24 (``block_new_requests`` set, no active
    request): without hf_vram's scheduler fix the waiting requests never run and ``stop()`` never returns."""
    model = _model("llama", "auto")
    manager = _manager(model, new_tokens=4, num_blocks=16)
    manager.start()
    try:
        with manager.pause():
            scheduler = manager.batch_processor.scheduler
            assert not scheduler.active_requests
            scheduler.block_new_requests = True
        ids = manager.add_requests(inputs=_prompts(3, seed=7), max_new_tokens=4)
        results = _drain(manager, set(ids), deadline_s=60)
        assert set(results) == set(ids) and all(len(r.generated_tokens) == 4 for r in results.values())
    finally:
        _stop(manager)


def test_soak_many_short_requests_keep_memory_flat():
    model = _model("qwen2", "int8")
    manager = _manager(model, new_tokens=2, num_blocks=16)
    manager.start()
    windows, total = [], 0
    try:
        for window in range(5):
            prompts = _prompts(400, seed=1000 + window)
            ids = manager.add_requests(inputs=prompts, max_new_tokens=2)
            results = _drain(manager, set(ids))
            assert len(results) == len(ids) and all(r.error is None and len(r.generated_tokens) == 2 for r in results.values())
            total += len(prompts)
            assert _all_blocks_free(manager), window
            windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    finally:
        _stop(manager)
    print(f"soak: {total} requests; peak RSS {windows[0] // 1024} -> {windows[-1] // 1024} MiB")
    assert total == 2000
    assert windows[-1] - windows[1] < 64 * 1024  # peak RSS (KiB) grows by less than 64 MiB after warm-up
