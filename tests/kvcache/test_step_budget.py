"""``kv_cache.step_prefill_tokens``: continuous batching's steps carry at most that many prompt tokens beside
decoding requests (a prompt longer than what is left continues in later steps), a step with no decoding request
keeps the whole budget, and the tokens are the same as without the cap."""

from __future__ import annotations

import pytest
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

import hf_vram
from hf_vram.kvcache.step_budget import NAME, PrefillCappedScheduler
from tests.kvcache.test_continuous import CALIBRATION, _batched, _preset, _prompts
from tests.tiny_models import build_tiny

CAP = 8


def _model():
    return hf_vram.optimize(build_tiny("llama").float().eval(), _preset("int8"), CALIBRATION)


def test_steps_beside_decodes_carry_at_most_the_cap_and_give_the_same_tokens(monkeypatch):
    model = _model()
    prompts = _prompts()
    uncapped = _batched(model, prompts)
    steps = []  # (decoding requests, tokens the step carries)
    original = PrefillCappedScheduler.schedule_batch

    def spy(self, token_budget, cache_budget):
        decoding = sum(s.status == RequestStatus.DECODING for s in self.active_requests.values())
        out = original(self, token_budget, cache_budget)
        steps.append((decoding, out[2]))
        return out

    monkeypatch.setattr(PrefillCappedScheduler, "schedule_batch", spy)
    model.config.quantization_config.kv_cache.step_prefill_tokens = CAP
    assert _batched(model, prompts) == uncapped
    assert steps, "the capped scheduler never ran"
    beside_decodes = [tokens - decoding for decoding, tokens in steps if decoding]
    assert beside_decodes and max(beside_decodes) <= CAP
    assert CAP in beside_decodes  # a prompt was cut at the cap and continued
    assert max(tokens for decoding, tokens in steps if not decoding) > CAP  # an idle step keeps the whole budget


def test_without_the_setting_continuous_batching_keeps_transformers_scheduler(monkeypatch):
    model = _model()
    calls = []
    monkeypatch.setattr(PrefillCappedScheduler, "schedule_batch", lambda *a: calls.append(a))
    # a config a capped run named hf_vram's scheduler in (the cache sets it there) goes back to Transformers' own
    config = ContinuousBatchingConfig(num_blocks=64, page_size=64, max_batch_tokens=128, scheduler_type=NAME)
    model.generate_batch(_prompts()[:2], continuous_batching_config=config, max_new_tokens=2, do_sample=False)
    assert not calls  # hf_vram's scheduler would have refused a model with no cap, or been called


def test_the_scheduler_refuses_a_cache_without_a_cap():
    cache = type("Cache", (), {"step_prefill_tokens": None})()
    with pytest.raises(ValueError, match=f"{NAME}.*step_prefill_tokens >= 1"):
        PrefillCappedScheduler(cache, None, 16)
