"""Steady load against an OpenAI-compatible server for a set time: does it lose requests, grow, or leak KV blocks?

``benchmarks/serve_soak.py`` runs this for ten minutes and the test suite for seconds. ``concurrency`` clients
(the ``openai`` async client) each send a streamed chat request, read it to its end and send the next, until
``seconds`` pass; the server's RSS (its process and children) is sampled every ``sample_s`` seconds. A request
counts as answered only when its stream ends with a finish reason: one cut short, or failed, is lost. After the
last answer the server's ``/metrics`` must come back to no request in flight and no pool block held
(``hf_vram_kv_pool_blocks_held``, read from the continuous-batching cache itself).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psutil


@dataclass
class SoakReport:
    """What a soak saw; ``rss`` holds ``(seconds since start, bytes)`` samples."""

    seconds: float
    sent: int = 0
    answered: int = 0
    refused: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    warmup_s: float = 0.0
    in_flight_after: float | None = None
    blocks_held_after: float | None = None
    blocks_free_after: float | None = None

    @property
    def lost(self) -> int:
        """Requests sent that were neither answered whole nor refused with a 429."""
        return self.sent - self.answered - self.refused

    def rss_band(self) -> tuple[float, float]:
        """After the warm-up: the lowest and highest RSS sample relative to their median (-0.02 = 2% below)."""
        steady = [b for t, b in self.rss if t >= self.warmup_s]
        if not steady:
            raise ValueError("hf_vram soak: no RSS sample after the warm-up; run longer or sample more often.")
        mid = statistics.median(steady)
        return min(steady) / mid - 1, max(steady) / mid - 1


def metric_sum(base_url: str, name: str) -> float | None:
    """The sum over labels of one series of the server's ``/metrics``, or None when it has no such series (or no
    ``/metrics``: ``transformers serve``)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return sum(values) if values else None


async def stream_chat(client, model: str, prompt: str, new_tokens: int):
    """One greedy, streamed chat request through the ``openai`` async ``client``: what every load here sends."""
    return await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
    )


def _sample_rss(pid: int, report: SoakReport, start: float, stop: threading.Event, every_s: float) -> None:
    while not stop.is_set():
        try:
            root = psutil.Process(pid)
            rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
            report.rss.append((time.monotonic() - start, rss))
        except psutil.Error:
            pass
        stop.wait(every_s)


async def _client_loop(client, model: str, prompts: list[str], offset: int, end: float, new_tokens: int, report):
    from openai import RateLimitError

    i = offset
    while time.monotonic() < end:
        prompt, i = prompts[i % len(prompts)], i + 1
        report.sent += 1
        try:
            stream = await stream_chat(client, model, prompt, new_tokens)
            finish, tokens = None, 0
            async for chunk in stream:
                if chunk.choices:
                    tokens += bool(chunk.choices[0].delta.content)
                    finish = chunk.choices[0].finish_reason or finish
        except RateLimitError:
            report.refused += 1
            continue
        except Exception as err:  # a lost request is the soak's finding, not its end
            report.errors.append(f"{type(err).__name__}: {err}"[:200])
            continue
        if finish is None:
            report.errors.append("the stream ended without a finish reason (a cut answer)")
            continue
        report.answered += 1
        report.tokens += tokens


def soak(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    seconds: float,
    concurrency: int,
    new_tokens: int,
    pid: int | None = None,
    sample_s: float = 1.0,
    warmup_fraction: float = 0.2,
    api_key: str = "unused",
    drain_s: float = 30.0,
) -> SoakReport:
    """Run the steady load described in the module docstring against ``base_url`` (``http://host:port``)."""
    from openai import AsyncOpenAI

    if not prompts or concurrency < 1 or seconds <= 0:
        raise ValueError("hf_vram soak: give at least one prompt, concurrency >= 1 and seconds > 0.")
    report = SoakReport(seconds=seconds, warmup_s=warmup_fraction * seconds)
    start, stop = time.monotonic(), threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(pid, report, start, stop, sample_s), daemon=True)
    if pid is not None:
        sampler.start()

    async def run() -> None:
        client = AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=max(120.0, seconds))
        end = start + seconds
        await asyncio.gather(*(_client_loop(client, model, prompts, c, end, new_tokens, report) for c in range(concurrency)))

    try:
        asyncio.run(run())
        report.seconds = time.monotonic() - start
        deadline = time.monotonic() + drain_s  # the server frees a request's blocks just after its last byte
        while True:
            report.in_flight_after = metric_sum(base_url, "hf_vram_in_flight")
            report.blocks_held_after = metric_sum(base_url, "hf_vram_kv_pool_blocks_held")
            report.blocks_free_after = metric_sum(base_url, "hf_vram_kv_pool_blocks_free")
            if (not report.in_flight_after and not report.blocks_held_after) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop.set()
    return report
