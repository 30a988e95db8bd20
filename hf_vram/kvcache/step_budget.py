"""A cap on the prompt tokens a continuous-batching step carries while other requests are decoding.

Transformers' FIFO scheduler puts every decoding request in a step first, then fills the step's token budget
(``max_batch_tokens``, 8192 by default) with prompts. Every decoding request waits for the whole step, so its gap
between two tokens is as long as the largest prefill that joins its step. On 2 CPU cores (SmolLM2) a prompt token
costs about 2 ms and a whole step of 16 decodes about 100 ms, so a step that admits a burst of prompts (several
requests finished on the same step and freed their blocks) is a gap of seconds.
That is a server's p99 time per output token, and it gets worse as a KV budget holds more requests: more requests
finish together and more decoding streams sit through each such step.

``PrefillCappedScheduler`` is that FIFO scheduler with ``kv_cache.step_prefill_tokens`` as the budget of prompt
tokens a step may carry *beside decoding requests*: a longer prompt is split over steps (Transformers' own chunked
prefill continues it first in the next step), and a step with no decoding request keeps the whole budget, so an
idle server still prefills a burst in one pass. Upstream would need no more than this: a per-step prefill budget
in ``ContinuousBatchingConfig`` (vLLM's chunked prefill with decode priority has the same cap in
``max_num_batched_tokens``).
"""

from __future__ import annotations

from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import FIFOScheduler

NAME = "hf_vram_prefill_capped"


class PrefillCappedScheduler(FIFOScheduler):
    """FIFO with prompt tokens beside decodes capped at the cache's ``step_prefill_tokens``."""

    def __init__(self, cache, safety_margin: float | None, max_requests_per_batch: int) -> None:
        cap = getattr(cache, "step_prefill_tokens", None)
        if cap is None or cap < 1:
            raise ValueError(
                f"hf_vram: the {NAME} scheduler needs kv_cache.step_prefill_tokens >= 1 on the model's hf_vram config "
                f"(got {cap!r}); set it, or use Transformers' scheduler_type 'fifo'."
            )
        super().__init__(cache, safety_margin, max_requests_per_batch)
        self.step_prefill_tokens = int(cap)

    def schedule_batch(self, token_budget: int, cache_budget: int):
        """The FIFO step, its token budget cut to the decoding requests plus the cap while any is decoding."""
        decoding = sum(state.status == RequestStatus.DECODING for state in self.active_requests.values())
        if decoding:
            token_budget = min(token_budget, decoding + self.step_prefill_tokens)
        return super().schedule_batch(token_budget, cache_budget)
