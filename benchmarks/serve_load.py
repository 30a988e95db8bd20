"""An OpenAI-compatible server under load, at one KV budget: `hf-vram serve` against `transformers serve`.

SmolLM2-135M-Instruct, bfloat16 activations, continuous batching in both. Rows (each server a fresh process on
127.0.0.1, stopped after its run):
- ``transformers serve --continuous-batching``: float weights, bfloat16 K/V pages, ``--cb-num-blocks`` sized to the
  budget; and the same in float32 (weights and K/V pages, half the blocks in the budget): what a user picks where
  the CPU has no native bfloat16 matmul;
- ``hf-vram serve --config kv-int8.yaml``: the same float checkpoint with hf_vram's int8 K/V pages only
  (``kv_cache: {dtype: int8}``) in the same budget: what the K/V pages alone change;
- ``hf-vram serve``: the same model saved by hf_vram with int8 weights, bfloat16 K/V pages in the same budget
  (``--kv-memory``), admission at its defaults: what the weights change;
- ``hf-vram serve --kv-bits 8`` / ``--kv-bits 4``: int8 weights and int8 / int4 K/V pages in the same budget.
Every ``hf-vram serve`` row runs its default step cap (256 prompt tokens beside decoding requests,
``kv_cache.step_prefill_tokens``); one more int8 + int8 row runs without it (``--step-prefill-tokens 0``:
Transformers' scheduler, whose steps take up to 8192 prompt tokens, as ``transformers serve``'s do).

Then tenants (``--tenants-only`` runs just this): one ``hf-vram serve`` (int8 weights and K/V) with two tenants of 4
concurrent requests each; the quiet tenant sends 3 rounds of 4 requests alone, then again while the other bursts
40 requests at once (10x its quota; its queue holds 40). Columns: the quiet tenant's TTFT p50/p99 solo and beside
the burst, and their ratio.

The load: ``--requests`` chat requests (pydoc questions of about 100-300 tokens), ``--new-tokens`` each, greedy and
streamed, all sent at once by the ``openai`` async client, bounded by ``--deadline`` seconds per row. Columns:
generated tokens/s over the run, time to first token and per output token (p50/p99, from the stream), requests
answered / refused (429) / failed, the server's peak RSS (the process and its children).

Usage: ``python benchmarks/serve_load.py [--requests 48] [--new-tokens 48] [--kv-memory 48MiB] [--only 'row;row']``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import child_env, results_path, write_result  # noqa: E402

from hf_vram.serving.soak import stream_chat  # noqa: E402

RESULTS = results_path("serve_load")
BIN = Path(sys.executable).parent


def prepare(folder: Path) -> dict[str, Path]:
    """The two checkpoints the servers read: SmolLM2 as Transformers saves it, and as hf_vram saves it (int8)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_vram
    from hf_vram.assets import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    out = {"plain": folder / "plain", "int8": folder / "int8"}
    AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16).save_pretrained(out["plain"])
    config = hf_vram.VramOptimizationConfig.from_preset("int8")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16, quantization_config=config)
    model.save_pretrained(out["int8"])
    for path in out.values():
        tokenizer.save_pretrained(path)
    return out


def kv_blocks(folder: Path, kv_memory: int, dtype_name: str = "bfloat16") -> int:
    """Continuous-batching blocks of ``dtype_name`` K/V that ``kv_memory`` bytes hold (what hf_vram's cache computes)."""
    import torch
    from transformers import AutoConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from hf_vram.kvcache.continuous import kv_token_capacity

    tokens = kv_token_capacity(AutoConfig.from_pretrained(folder), kv_memory, "auto", getattr(torch, dtype_name))
    return max(1, tokens // ContinuousBatchingConfig().page_size)


def questions(count: int) -> list[str]:
    """Chat prompts cut from pydoc text: one topic each, 400-1200 characters."""
    from hf_vram.assets import pydoc_text

    text = pydoc_text()
    step = max(1, len(text) // (count + 1))
    return [
        "Summarise this Python documentation in one sentence:\n" + text[i * step : i * step + 400 + (i * 97) % 800]
        for i in range(count)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, its peak RSS sampled while it lives."""

    def __init__(self, cmd: list[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port), "--host", "127.0.0.1", "--device", "cpu"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.proc.pid)
                rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def wait_healthy(self, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before answering /health")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError("the server did not answer /health in time")

    def stop(self) -> None:
        """Kill the server's process group and wait until none of it is left (a process of it still exiting would
        take CPU from the next row's server)."""
        self._stop.set()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        time.sleep(2.0)  # the kernel gives the memory back


async def load(port: int, model: str, prompts: list[str], new_tokens: int, deadline_s: float) -> dict:
    """Every prompt at once, streamed; per request: first-token time, token gaps, outcome."""
    from openai import AsyncOpenAI, RateLimitError

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=deadline_s)

    async def one(prompt: str) -> dict:
        start, stamps = time.perf_counter(), []
        try:
            stream = await stream_chat(client, model, prompt, new_tokens)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
        except RateLimitError:
            return {"outcome": "refused"}
        except Exception as err:  # a failure is a row's number, not the benchmark's end
            return {"outcome": "failed", "error": f"{type(err).__name__}: {err}"[:200]}
        gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        return {"outcome": "answered", "ttft": stamps[0] - start if stamps else None, "gaps": gaps, "tokens": len(stamps)}

    start = time.perf_counter()
    done = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), deadline_s)
    return {"seconds": time.perf_counter() - start, "requests": done}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_row(name: str, cmd: list[str], model: str, prompts: list[str], args) -> dict:
    server = Server(cmd)
    try:
        server.wait_healthy()
        measured = asyncio.run(load(server.port, model, prompts, args.new_tokens, args.deadline))
    finally:
        server.stop()
    answered = [r for r in measured["requests"] if r["outcome"] == "answered"]
    tokens = sum(r["tokens"] for r in answered)
    ttfts = [r["ttft"] for r in answered if r["ttft"] is not None]
    gaps = [g for r in answered for g in r["gaps"]]
    failed = [r for r in measured["requests"] if r["outcome"] == "failed"]
    return {
        "name": name,
        "tokens_per_s": tokens / measured["seconds"],
        "seconds": measured["seconds"],
        "answered": len(answered),
        "refused": sum(r["outcome"] == "refused" for r in measured["requests"]),
        "failed": len(failed),
        "first_error": failed[0]["error"] if failed else None,
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p99_s": pct(ttfts, 0.99),
        "tpot_p50_ms": 1e3 * pct(gaps, 0.5),
        "tpot_p99_ms": 1e3 * pct(gaps, 0.99),
        "mean_tpot_ms": 1e3 * statistics.fmean(gaps) if gaps else float("nan"),
        "peak_rss_mib": server.peak_rss / 2**20,
    }


TENANTS = """tenants:
  - {name: quiet, api_key: quiet-key, max_concurrent: 4, max_queued: 8}
  - {name: burst, api_key: burst-key, max_concurrent: 4, max_queued: 40}
"""


async def _rounds(port: int, model: str, key: str, prompts: list[str], rounds: int, new_tokens: int) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)

    async def one(prompt: str) -> dict:
        start = time.perf_counter()
        stream = await stream_chat(client, model, prompt, new_tokens)
        ttft = None
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
        return {"ttft": ttft}

    out = []
    for _ in range(rounds):
        out += await asyncio.gather(*(one(p) for p in prompts))
    return out


async def _with_burst(port: int, model: str, quiet: list[str], burst: list[str], new_tokens: int) -> tuple[list, list]:
    burst_task = asyncio.ensure_future(_rounds(port, model, "burst-key", burst, 1, new_tokens))
    await asyncio.sleep(2.0)  # the burst is admitted and queued first
    quiet_out = await _rounds(port, model, "quiet-key", quiet, 3, new_tokens)
    return quiet_out, await burst_task


def tenants_row(folder: Path, kv_memory: int, prompts: list[str], new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(TENANTS)
    cmd = [str(BIN / "hf-vram"), "serve", str(folder), "--kv-bits", "8", "--kv-memory", str(kv_memory)]
    server = Server([*cmd, "--tenants", f.name, "--continuous-batching", "--dtype", "bfloat16"])
    try:
        server.wait_healthy()
        solo = asyncio.run(_rounds(server.port, str(folder), "quiet-key", prompts[:4], 3, new_tokens))
        beside, burst = asyncio.run(_with_burst(server.port, str(folder), prompts[:4], prompts[4:44], new_tokens))
    finally:
        server.stop()
        os.unlink(f.name)
    solo_t = [r["ttft"] for r in solo if r["ttft"] is not None]
    beside_t = [r["ttft"] for r in beside if r["ttft"] is not None]
    return {
        "quiet_solo_ttft_p50_s": pct(solo_t, 0.5),
        "quiet_solo_ttft_p99_s": pct(solo_t, 0.99),
        "quiet_burst_ttft_p50_s": pct(beside_t, 0.5),
        "quiet_burst_ttft_p99_s": pct(beside_t, 0.99),
        "p99_ratio": pct(beside_t, 0.99) / pct(solo_t, 0.99),
        "quiet_answered": len(beside_t),
        "burst_answered": sum(r["ttft"] is not None for r in burst),
    }


def tables(result: dict) -> list[str]:
    """The BENCHMARKS.md section of a serve_load run."""
    rows = result["rows"]
    base = next((r for r in rows if r["name"].startswith("transformers serve")), None)
    lines = [
        "### An OpenAI-compatible server under load (`benchmarks/serve_load.py`)",
        "",
        f"Run {result['date']} on {result['machine']}. SmolLM2-135M-Instruct, bfloat16 activations, continuous "
        f"batching; {result['requests']} streamed chat requests sent at once by the `openai` async client over "
        f"127.0.0.1, {result['new_tokens']} new tokens each, greedy; one KV budget of "
        f"{result['kv_memory'] / 2**20:.1f} MiB ({result['bf16_blocks']} blocks of bfloat16 K/V for "
        "`transformers serve`; hf_vram's int8 pages fit about twice the tokens in it).",
        "",
        "| server | tokens/s | x transformers serve | TTFT p50 / p99 s | TPOT p50 / p99 ms | answered / 429 / failed "
        "| server peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and base["tokens_per_s"] else "-"
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f} | {r['answered']} / {r['refused']} / {r['failed']} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    errors = [f"{r['name']}: {r['first_error']}" for r in rows if r.get("first_error")]
    lines += [""] + [f"First failure: {e}" for e in errors] if errors else []
    t = result.get("tenants")
    if t:
        lines += [
            "",
            f"Two tenants (run {t.get('date', result['date'])}; `hf-vram serve`, int8 weights and K/V, each tenant 4 "
            "concurrent requests): the quiet tenant's 3 rounds of 4 streamed requests alone, then while the other "
            "tenant bursts 40 requests (10x its quota) at once.",
            "",
            "| quiet tenant | TTFT p50 s | TTFT p99 s |",
            "|---|---|---|",
            f"| alone | {t['quiet_solo_ttft_p50_s']:.2f} | {t['quiet_solo_ttft_p99_s']:.2f} |",
            f"| beside the burst | {t['quiet_burst_ttft_p50_s']:.2f} | {t['quiet_burst_ttft_p99_s']:.2f} |",
            "",
            f"p99 beside the burst / alone: {t['p99_ratio']:.2f}x (target <= 2x); answered: quiet "
            f"{t['quiet_answered']} of 12, burst {t['burst_answered']} of 40.",
        ]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kv-memory", default="48MiB", help="the KV budget both servers get")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds a row may take")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="re-run only these rows ('row;row'); the others stay")
    parser.add_argument("--tenants-only", action="store_true", help="run the two-tenant scenario only (kept rows stay)")
    args = parser.parse_args()
    from hf_vram.config.checks import parse_bytes

    kv_memory = parse_bytes(args.kv_memory)
    prompts = questions(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        folders = prepare(Path(tmp))
        if args.tenants_only:
            previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
            tenants = {"date": time.strftime("%Y-%m-%d %H:%M"), **tenants_row(folders["int8"], kv_memory, questions(44), 32)}
            previous.pop("machine", None), previous.pop("versions", None)
            write_result(args.out, {**previous, "tenants": tenants})
            print(json.dumps(tenants))
            return
        blocks = kv_blocks(folders["plain"], kv_memory)
        common = ["--continuous-batching", "--dtype", "bfloat16"]
        kv_only = Path(tmp) / "kv-int8.yaml"  # float weights, hf_vram's int8 K/V pages: what the K/V alone changes
        kv_only.write_text("kv_cache:\n  dtype: int8\n  enabled: false\n")
        hf_vram_serve = [str(BIN / "hf-vram"), "serve"]
        commands = {
            "transformers serve, bf16 KV": (
                [str(BIN / "transformers"), "serve", str(folders["plain"]), *common, "--cb-num-blocks", str(blocks)],
                folders["plain"],
            ),
            # where bfloat16 matmul is slow (a CPU without native bf16), the float32 server a user would pick there:
            # twice the K/V bytes per token, so half the blocks in the same budget
            "transformers serve, float32 weights and KV": (
                [
                    str(BIN / "transformers"),
                    "serve",
                    str(folders["plain"]),
                    "--continuous-batching",
                    "--dtype",
                    "float32",
                    "--cb-num-blocks",
                    str(kv_blocks(folders["plain"], kv_memory, "float32")),
                ],
                folders["plain"],
            ),  # fmt: skip
            "hf-vram serve, bf16 weights + int8 KV": (
                [*hf_vram_serve, str(folders["plain"]), "--config", str(kv_only), "--kv-memory", str(kv_memory), *common],
                folders["plain"],
            ),
            "hf-vram serve, int8 weights, bf16 KV": (
                [*hf_vram_serve, str(folders["int8"]), "--kv-memory", str(kv_memory), *common],
                folders["int8"],
            ),
            **{
                f"hf-vram serve, int8 weights + int{bits} KV": (
                    [*hf_vram_serve, str(folders["int8"]), "--kv-bits", bits, "--kv-memory", str(kv_memory), *common],
                    folders["int8"],
                )
                for bits in ("8", "4")
            },
            "hf-vram serve, int8 weights + int8 KV, no step cap": (
                [*hf_vram_serve, str(folders["int8"]), "--kv-bits", "8", "--kv-memory", str(kv_memory), *common]
                + ["--step-prefill-tokens", "0"],
                folders["int8"],
            ),
        }
        only = [name for name in args.only.split(";") if name] or list(commands)
        unknown = sorted(set(only) - set(commands))
        if unknown:
            raise SystemExit(f"serve_load: no row named {unknown}; rows: {list(commands)}")
        rows = [run_row(name, cmd, str(folder), prompts, args) for name, (cmd, folder) in commands.items() if name in only]
        if args.only:  # the rows not re-run stay as they were
            previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
            fresh = {r["name"] for r in rows}
            rows = [r for r in previous.get("rows", []) if r["name"] not in fresh] + rows
            rows.sort(key=lambda r: list(commands).index(r["name"]) if r["name"] in commands else len(commands))
            write_result(args.out, {**{k: v for k, v in previous.items() if k not in ("machine", "versions")}, "rows": rows})
            print(json.dumps(rows))
            return
        tenants = {"date": time.strftime("%Y-%m-%d %H:%M"), **tenants_row(folders["int8"], kv_memory, questions(44), 32)}
    result = {
        "tenants": tenants,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "kv_memory": kv_memory,
        "bf16_blocks": blocks,
        "rows": rows,
    }
    write_result(args.out, result)
    print("\n".join(tables({**result, "machine": "this machine"})))


if __name__ == "__main__":
    main()
