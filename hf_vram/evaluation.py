"""Quality and speed measurements shared by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import math
import statistics
import time

import torch

# K/V read back as quantized pages hold them lives with the K/V cache (the planner uses it too); measured here
from hf_vram.kvcache.readback import quantized_kv_attention, window_round_trip, windowed_round_trip  # noqa: F401


def token_stream(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"hf_vram: the text has {ids.numel()} tokens, fewer than the {n_tokens} asked for.")
    return ids[:n_tokens]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int = 512, batch_size: int = 4) -> float:
    """Perplexity over non-overlapping windows, each scored alone (no carried context, no BOS).

    ``ids`` must hold a whole number of windows; every window contributes ``window - 1`` predictions.
    """
    if ids.numel() % window:
        raise ValueError(f"hf_vram: {ids.numel()} tokens is not a whole number of {window}-token windows.")
    windows = ids.view(-1, window)
    device = next(model.parameters(), torch.empty(0)).device
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def compile_config(fullgraph: bool = True):
    """Transformers' ``CompileConfig`` for compiled decode on any device (by default ``generate`` compiles only on
    accelerators); with ``cache_implementation="static"``, ``generate`` compiles the decode step once."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=fullgraph)
    config._compile_all_devices = True
    return config


def compiled_generate_kwargs(fullgraph: bool = True) -> dict:
    """The ``generate`` keyword arguments of compiled decode: a static cache and ``compile_config``."""
    return {"cache_implementation": "static", "compile_config": compile_config(fullgraph)}


@torch.inference_mode()
def decode_rate(
    model,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    new_tokens: int = 64,
    cache=None,
    compiled: bool = False,
) -> float:
    """Greedy tokens/s of one ``generate`` (all rows of ``ids`` counted) between its first and last new token, so
    prefill is excluded. ``cache`` (e.g. a ``PooledKVCache``) replaces the default DynamicCache; ``compiled``
    decodes with a static cache through ``torch.compile`` (the first call compiles)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    clock = _Clock()
    extra = {"cache": cache} if cache is not None else {}
    if compiled:
        extra.update(compiled_generate_kwargs())
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=0,
        **extra,
    )
    return ids.shape[0] * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def decode_speed(model, prompt_ids: torch.Tensor, new_tokens: int = 64, repeats: int = 3, compiled: bool = False) -> float:
    """Greedy tokens/s of every row of ``prompt_ids`` (prefill excluded), median of ``repeats`` runs after one
    warm-up (which, with ``compiled``, also compiles)."""
    decode_rate(model, prompt_ids, new_tokens=new_tokens, compiled=compiled)
    return statistics.median(decode_rate(model, prompt_ids, new_tokens=new_tokens, compiled=compiled) for _ in range(repeats))


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    model(ids.view(1, -1), logits_to_keep=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids.view(1, -1), logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def greedy_tokens(model, prompt_ids: torch.Tensor, new_tokens: int = 30, compiled: bool = False) -> list[int]:
    out = model.generate(
        prompt_ids.view(1, -1),
        attention_mask=torch.ones(1, prompt_ids.numel(), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **(compiled_generate_kwargs() if compiled else {}),
    )
    return out[0, prompt_ids.numel() :].tolist()
