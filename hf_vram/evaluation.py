"""Quality and speed measurements shared by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_vram.kvcache.codec import KVCodec


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


@contextmanager
def quantized_kv_attention(model, bits: int | None):
    """Within the block, every attention of ``model`` reads its keys and values as ``bits``-bit K/V pages return
    them (``KVCodec`` round trip, keys rotated for 4 and 2 bits), which is what a decode step over hf_vram's
    quantized paged cache reads for every past token; ``bits=None`` leaves the model as it is. For measuring KV
    quality with a plain forward (``perplexity``) instead of a serving run."""
    if bits is None:
        yield model
        return
    original = model.config._attn_implementation
    base = ALL_ATTENTION_FUNCTIONS[original if original in ALL_ATTENTION_FUNCTIONS else "sdpa"]
    codecs: dict[tuple, tuple[KVCodec, KVCodec]] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        b, h, t, d = key.shape
        if (h, d) not in codecs:
            codecs[(h, d)] = (KVCodec(bits, h, d, rotate=True), KVCodec(bits, h, d))
        kc, vc = codecs[(h, d)]
        key = kc.round_trip(key.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2)
        value = vc.round_trip(value.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2)
        return base(module, query, key, value, attention_mask, **kwargs)

    name = f"hf_vram_kv{bits}_eval"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(original)
