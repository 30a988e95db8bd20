"""``hf-vram serve``: Transformers' OpenAI-compatible server in a process with hf_vram, driven by the ``openai``
client over 127.0.0.1 only (bounded: a few requests, each with a timeout), on SmolLM2 with int8 weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import pydoc_text, smollm2_path
from hf_vram.config import kv_cache_section
from hf_vram.serving import apply_kv_overrides, kv_overrides, serve
from hf_vram.serving.server import (
    DEFAULT_STEP_PREFILL_TOKENS,
    kv_budget_tokens,
    request_sizer,
    request_window_tokens,
    served_model_config,
    step_prefill_cap,
)
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is a generator?"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """SmolLM2 with int8 weights, saved by hf_vram with its tokenizer (what a user serves)."""
    out = tmp_path_factory.mktemp("served") / "smollm2-int8"
    config = hf_vram.VramOptimizationConfig.from_preset("int8")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32, quantization_config=config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hf_vram.cli", "serve", str(saved), "--max-concurrent", "16", "--max-queued", "16"]
    cmd += ["--continuous-batching", "--kv-memory", "32MiB", "--port", str(port)]  # pages touched stay few
    cmd += ["--cb-max-batch-tokens", "128"]  # a long prompt takes several steps
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [*cmd, "--device", "cpu", "--host", "127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
        stdout=log,
        stderr=subprocess.STDOUT,  # a file, not a pipe: a busy server's log never fills a buffer and blocks it
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited {proc.returncode}: {log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server did not answer /health within 240 s")
        yield base, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def _greedy(saved: Path, ids: torch.Tensor, new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_chat_completions_and_streaming_give_generates_greedy_text(server, saved):
    from openai import OpenAI

    server, _ = server
    client = OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    chat_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    chat_ids = chat_ids if isinstance(chat_ids, torch.Tensor) else chat_ids["input_ids"]
    expected_chat = _greedy(saved, chat_ids, 16)

    reply = client.chat.completions.create(model=str(saved), messages=QUESTION, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected_chat
    stream = client.chat.completions.create(model=str(saved), messages=QUESTION, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_chat

    prompt = "def fibonacci(n):"
    completion = client.completions.create(model=str(saved), prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == _greedy(saved, tokenizer(prompt, return_tensors="pt").input_ids, 12)

    # a prompt of several hundred tokens, prefilled in steps of 128 (the server's --cb-max-batch-tokens)
    long_prompt = pydoc_text()[20_000:22_000]
    long_ids = tokenizer(long_prompt, return_tensors="pt").input_ids
    assert long_ids.shape[1] > 3 * 128
    completion = client.completions.create(model=str(saved), prompt=long_prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].text == _greedy(saved, long_ids, 8)

    with urllib.request.urlopen(server + "/metrics", timeout=10) as reply:  # the admission layer counted them
        metrics = reply.read().decode()
    assert 'hf_vram_requests_total{outcome="completed",tenant="default"} 4.0' in metrics


def test_overload_every_request_is_answered_right_or_refused_and_health_answers(server, saved):
    """200 requests at once into a server that runs 16 and queues 16: each gets generate's text or a 429, never an
    error or a cut answer; /health answers throughout; the server's memory stays within 256 MiB of its idle size."""
    import asyncio

    import psutil
    from openai import AsyncOpenAI, RateLimitError

    base, pid = server
    tokenizer = AutoTokenizer.from_pretrained(saved)
    prompt = "The Python keyword `yield` makes"
    expected = _greedy(saved, tokenizer(prompt, return_tensors="pt").input_ids, 4)
    process = psutil.Process(pid)
    idle_rss, peak_rss = process.memory_info().rss, 0

    async def run():
        nonlocal peak_rss
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", timeout=240, max_retries=0)

        async def one():
            try:
                reply = await client.completions.create(model=str(saved), prompt=prompt, max_tokens=4, temperature=0)
            except RateLimitError as err:
                assert err.response.headers["retry-after"] == "1"
                return "429"
            return reply.choices[0].text

        async def watch(burst):
            nonlocal peak_rss
            health = []
            while not burst.done():
                health.append(await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/health", timeout=10).status))
                peak_rss = max(peak_rss, process.memory_info().rss)
                await asyncio.sleep(0.2)
            return health

        burst = asyncio.ensure_future(asyncio.gather(*(one() for _ in range(200))))
        health = await watch(burst)
        return await burst, health

    outcomes, health = asyncio.run(run())
    answered = [o for o in outcomes if o != "429"]
    assert 16 <= len(answered) < 200 and outcomes.count("429") == 200 - len(answered)
    assert all(text == expected for text in answered)
    assert health and set(health) == {200}
    assert peak_rss - idle_rss < 256 * 2**20, (idle_rss, peak_rss)


def test_kv_flags_set_the_models_kv_section_and_refuse_what_they_cannot_hold():
    model = hf_vram.optimize(build_tiny("llama").float(), {"quantization": {"scheme": "int8"}})
    apply_kv_overrides(model, kv_overrides(4, "32MiB"))
    section = model.config.quantization_config.kv_cache
    assert (section.dtype, section.max_memory, section.enabled) == ("int4", 32 * 2**20, False)
    with pytest.raises(ValueError, match="--preset"):
        apply_kv_overrides(build_tiny("llama"), kv_overrides(8, None))
    for flags in ({"kv_bits": 4}, {"kv_memory": "32MiB"}, {"step_prefill_tokens": 64}):  # a plain checkpoint, no preset
        with pytest.raises(ValueError, match="--preset"):  # refused before the server starts, not when it loads
            serve(str(smollm2_path()), ["--continuous-batching"], **flags)
    # a model with int8 K/V layers (the long-context preset's) keeps them at int2 and drops them at int8
    widened = hf_vram.optimize(build_tiny("llama").float(), {"kv_cache": {"dtype": "int4", "int8_layers": [1]}})
    apply_kv_overrides(widened, kv_overrides(2, None))
    assert widened.config.quantization_config.kv_cache.int8_layers == [1]
    apply_kv_overrides(widened, kv_overrides(8, None))
    section = widened.config.quantization_config.kv_cache
    assert (section.dtype, section.int8_layers) == ("int8", None)
    assert kv_overrides(None, "6291456") == {"max_memory": 6291456}
    with pytest.raises(ValueError, match="8, 4 or 2"):
        kv_overrides(3, None)
    with pytest.raises(ValueError, match="max_memory"):
        kv_overrides(None, "lots")


def test_hf_vram_models_are_served_with_a_step_prefill_cap_unless_told_otherwise():
    """The flag wins (0: Transformers' uncapped scheduler); else an hf_vram model's config, else the default; a plain
    model gets nothing (its config has no kv_cache section to set)."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"step_prefill_tokens": 96})
    assert step_prefill_cap(None, None, config) == 96
    assert step_prefill_cap(None, {"kv_cache": {"step_prefill_tokens": 64}}, None) == 64
    assert step_prefill_cap(None, {"kv_cache": {"dtype": "int8"}}, None) == DEFAULT_STEP_PREFILL_TOKENS
    assert step_prefill_cap(None, None, hf_vram.VramOptimizationConfig()) == DEFAULT_STEP_PREFILL_TOKENS
    assert step_prefill_cap(0, None, config) == 0 and step_prefill_cap(32, None, config) == 32
    assert step_prefill_cap(None, None, None) is None
    assert kv_overrides(None, None, 0) == {"step_prefill_tokens": None}
    model = hf_vram.optimize(build_tiny("llama").float(), {"quantization": {"scheme": "int8"}})
    apply_kv_overrides(model, kv_overrides(8, None, 128))
    assert model.config.quantization_config.kv_cache.step_prefill_tokens == 128
    with pytest.raises(ValueError, match="step_prefill_tokens"):
        kv_overrides(None, None, -1)


def test_the_server_sizes_requests_with_the_tokenizer_and_the_budget_in_the_pages_format(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved)
    size = request_sizer(str(saved))
    chat = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert size({"messages": QUESTION, "max_tokens": 16}) == len(tokenizer(chat, add_special_tokens=False).input_ids) + 16
    assert size({"prompt": "def f(x):"}) == len(tokenizer("def f(x):", add_special_tokens=False).input_ids) + 256
    served = served_model_config(str(saved))
    bf16 = kv_budget_tokens(served, 48 * 2**20, "auto", ["--dtype", "bfloat16"])
    assert bf16 == 48 * 2**20 // (30 * 2 * 3 * 64 * 2)  # SmolLM2: 30 layers, 3 KV heads of 64, K and V, 2 bytes
    assert 1.8 < kv_budget_tokens(served, 48 * 2**20, "int8", []) / bf16 < 2.0
    # int4 pages: each request also holds its window (64 tokens of K and V in int8 rows, in whole pages)
    assert 3.6 < kv_budget_tokens(served, 48 * 2**20, "int4", []) / bf16 < 3.8  # 103-byte rows against 384 bf16
    assert request_window_tokens(served, "int8", []) == 0
    window = request_window_tokens(served, "int4", [])
    # pages of 64 tokens (one key group): the window borrows its unfinished group's page block, one block beside
    assert window == 256 and request_window_tokens(served, "int4", ["--cb-block-size", "64"]) == 64
    with_window = request_sizer(str(saved), extra_tokens=window)
    assert with_window({"prompt": "def f(x):"}) == size({"prompt": "def f(x):"}) + 256


def test_admission_sizes_a_plain_checkpoint_by_the_pages_its_preset_and_flags_build():
    """A plain checkpoint served with ``--preset``/``--config``: the pages its K/V budget holds and each request's
    window are those of the config it loads with (its sink, recent and int8 layers), as the flags leave it."""
    plain = str(smollm2_path())
    page, budget = ["--cb-block-size", "64"], 48 * 2**20
    int4 = served_model_config(plain, hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4"}))
    tokens, window = kv_budget_tokens(int4, budget, "int4", page), request_window_tokens(int4, "int4", page)
    # the long-context preset widens one layer to int8 pages (two int4 pages of each block) before it is chosen
    long_context = served_model_config(plain, hf_vram.VramOptimizationConfig.from_preset("long-context"))
    # an int4 row of SmolLM2's K (or V): 96 bytes of codes, 7 of meta (a K and V row pair: 12 of key meta, 2 of value scale)
    assert tokens == budget // (30 * 2 * 103)
    assert kv_budget_tokens(long_context, budget, "int4", page) == budget // (31 * 2 * 103)
    assert request_window_tokens(long_context, "int4", page) > window  # its window holds a block of its own
    int2 = served_model_config(plain, hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int2", "int4_layers": [18]}))
    assert kv_budget_tokens(int2, budget, "int2", page) == budget // (31 * 2 * 60)  # an int4 layer: two int2 pages
    kept = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "sink_tokens": 64, "recent_tokens": 64})
    assert request_window_tokens(served_model_config(plain, kept), "int4", page) > 2 * window  # three groups, not one
    # --kv-bits 8 over it stores every layer in int8 pages: its int8 layers and window go
    flagged = served_model_config(plain, hf_vram.VramOptimizationConfig.from_preset("long-context"), kv_overrides(8, "48MiB"))
    int8 = served_model_config(plain, hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int8"}))
    assert kv_budget_tokens(flagged, budget, "int8", page) == kv_budget_tokens(int8, budget, "int8", page)
    assert request_window_tokens(flagged, "int8", page) == 0
    assert kv_cache_section(served_model_config(plain)) is None  # served as it is: Transformers' own pages


def test_a_preset_on_a_checkpoint_hf_vram_saved_is_refused(saved):
    with pytest.raises(ValueError, match="already holds its optimization"):
        serve(str(saved), [], config=hf_vram.VramOptimizationConfig.from_preset("int4"))


def test_a_short_soak_loses_nothing_and_gives_every_block_back(server, saved):
    """Seconds of the ten-minute soak (``benchmarks/serve_soak.py``): 4 clients at steady load, each answer read
    to its finish reason; afterwards no request is in flight and the continuous-batching pool holds no block, and
    the server's memory did not climb after the warm-up."""
    from hf_vram.serving.soak import soak

    base, pid = server
    prompts = [f"Name {n} Python keywords." for n in range(2, 8)]
    report = soak(base, str(saved), prompts, seconds=12, concurrency=4, new_tokens=8, pid=pid, sample_s=0.25, warmup_fraction=0.5)
    assert report.errors == [] and report.lost == 0 and report.refused == 0
    assert report.answered >= 4 and report.tokens >= 4 * report.answered
    assert report.in_flight_after == 0 and report.blocks_held_after == 0
    assert report.blocks_free_after and report.blocks_free_after > 0  # the pool the server runs on was read
    low, high = report.rss_band()
    assert high - low < 0.10, report.rss
