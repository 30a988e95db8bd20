"""``generate_many``: many requests, one KV pool, several threads, with admission control.

Each request is a batch-1 ``generate`` over its own ``PooledKVCache``; requests that share a prompt prefix share
its blocks in the pool. Admission reserves a request's worst case (prompt + new tokens, in blocks) before it
starts, so admitted requests never run out of blocks while the pool is used only through the engine; a request
that must wait waits for others to finish. If something outside the engine takes the blocks anyway, the request
is preempted (its blocks released) and recomputed from its prompt once blocks free up. A request that could not fit
even in an empty pool is refused up front with the numbers. Results come back in the order of ``prompts``, each
exactly what a sequential run gives, since every request computes the same batch-1 forwards.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_vram.kvcache.cache import PooledKVCache
from hf_vram.kvcache.pool import KVCachePool, PoolExhaustedError


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished; its blocks went back to the pool."""


class _Admission:
    """Worst-case block reservations of running requests; a new one waits until its reservation fits."""

    def __init__(self, pool: KVCachePool) -> None:
        self.pool = pool
        self.reserved = 0
        self.cond = threading.Condition()

    def acquire(self, blocks: int, cancelled: threading.Event) -> None:
        with self.cond:
            while self.reserved + blocks > self.pool.num_blocks - 1:
                if cancelled.is_set():
                    raise RequestCancelled("hf_vram: request cancelled while waiting for KV blocks")
                self.cond.wait(timeout=0.05)
            self.reserved += blocks

    def release(self, blocks: int) -> None:
        with self.cond:
            self.reserved -= blocks
            self.cond.notify_all()


class _StopWhenCancelled(StoppingCriteria):
    """A stopping criterion that ends generation at the next step once the request is cancelled."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate_many(
    model,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    pool: KVCachePool | None = None,
    *,
    max_new_tokens: int = 32,
    workers: int = 4,
    cancel: dict[int, threading.Event] | None = None,
    **generate_kwargs,
) -> list[torch.Tensor | None]:
    """Generate for every prompt over one pool; returns each request's new tokens (None for a cancelled one).

    ``cancel`` maps request indices to events: setting one stops that request at its next step (or before it
    starts) and frees its blocks. ``generate_kwargs`` go to ``model.generate`` (e.g. ``do_sample``, ``top_k``).
    """
    pool = pool if pool is not None else KVCachePool.for_model(model)
    admission = _Admission(pool)
    device = next(model.parameters()).device
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(
            f"hf_vram generate_many: prompt(s) {empty[:5]} hold no tokens; every request needs at least one prompt token "
            "(e.g. the tokenizer's BOS token id). Nothing was generated."
        )
    bs = pool.block_size
    needs = [-(-(p.numel() + max_new_tokens) // bs) for p in prompts]
    for i, need in enumerate(needs):
        if need > pool.num_blocks - 1:
            raise ValueError(
                f"hf_vram generate_many: request {i} ({prompts[i].numel()} prompt + {max_new_tokens} new tokens) needs "
                f"{need} blocks of {bs} tokens; the pool has {pool.num_blocks - 1}. Raise num_blocks/max_memory or "
                "lower max_new_tokens."
            )
    cancel = cancel or {}

    def run(i: int) -> torch.Tensor | None:
        event = cancel.get(i, threading.Event())
        try:
            admission.acquire(needs[i], event)
        except RequestCancelled:
            return None
        try:
            while True:
                if event.is_set():
                    return None
                cache = PooledKVCache(pool)
                try:
                    out = model.generate(
                        prompts[i][None].to(device),
                        attention_mask=torch.ones(1, prompts[i].numel(), dtype=torch.long, device=device),
                        cache=cache,
                        max_new_tokens=max_new_tokens,
                        stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(event)]),
                        **generate_kwargs,
                    )
                except PoolExhaustedError:
                    out = None
                finally:
                    cache.release()
                if out is None:  # preempted: its blocks went back above; recompute from the prompt once some free up
                    with pool.freed:
                        pool.freed.wait(timeout=0.05)
                    continue
                return None if event.is_set() else out[0, prompts[i].numel() :].cpu()
        finally:
            admission.release(needs[i])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        return list(executor.map(run, range(len(prompts))))
