"""A ten-minute soak of `hf-vram serve` at steady load: no lost request, RSS flat (+-5%), pool empty at the end.

SmolLM2-135M-Instruct saved by hf_vram with int8 weights, served with int8 K/V pages in a 48 MiB budget
(continuous batching, bfloat16 activations). ``--concurrency`` clients of the ``openai`` async client each send a
streamed chat request (pydoc questions), read it to its finish reason and send the next, for ``--seconds``
(``hf_vram.serving.soak``); the server's RSS (process and children) is sampled every second. Afterwards the server's
``/metrics`` must show no request in flight and no block held by a request in its continuous-batching pool.

Usage: ``python benchmarks/serve_soak.py [--seconds 600] [--concurrency 8] [--new-tokens 32]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from common import results_path, write_result  # noqa: E402
from serve_load import BIN, Server, prepare, questions  # noqa: E402

RESULTS = results_path("serve_soak")


def run(seconds: float, concurrency: int, new_tokens: int, kv_memory: str) -> dict:
    from hf_vram.serving.soak import soak

    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare(Path(tmp))["int8"]
        cmd = [str(BIN / "hf-vram"), "serve", str(folder), "--kv-bits", "8", "--kv-memory", kv_memory]
        server = Server([*cmd, "--continuous-batching", "--dtype", "bfloat16"])
        try:
            server.wait_healthy()
            report = soak(
                f"http://127.0.0.1:{server.port}",
                str(folder),
                questions(64),
                seconds=seconds,
                concurrency=concurrency,
                new_tokens=new_tokens,
                pid=server.proc.pid,
            )
        finally:
            server.stop()
    low, high = report.rss_band()
    minutes = {}
    for t, rss in report.rss:
        minutes.setdefault(int(t // 60), []).append(rss / 2**20)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": report.seconds,
        "concurrency": concurrency,
        "new_tokens": new_tokens,
        "kv_memory": kv_memory,
        "sent": report.sent,
        "answered": report.answered,
        "refused": report.refused,
        "lost": report.lost,
        "first_error": report.errors[0] if report.errors else None,
        "tokens_per_s": report.tokens / report.seconds,
        "warmup_s": report.warmup_s,
        "rss_band": [low, high],
        "rss_mib_by_minute": {m: statistics.median(v) for m, v in sorted(minutes.items())},
        "in_flight_after": report.in_flight_after,
        "blocks_held_after": report.blocks_held_after,
        "blocks_free_after": report.blocks_free_after,
    }


def tables(result: dict) -> list[str]:
    """The BENCHMARKS.md section of a soak."""
    low, high = result["rss_band"]
    by_minute = " / ".join(f"{v:.0f}" for v in result["rss_mib_by_minute"].values())
    return [
        "### A soak at steady load (`benchmarks/serve_soak.py`)",
        "",
        f"Run {result['date']} on {result['machine']}. `hf-vram serve`, SmolLM2 int8 weights and int8 K/V pages in "
        f"{result['kv_memory']}, continuous batching; {result['concurrency']} `openai` clients each streaming one "
        f"chat request after another ({result['new_tokens']} new tokens, greedy) for {result['seconds']:.0f} s.",
        "",
        "| sent | answered | 429 | lost | tokens/s | RSS after warm-up, min / max vs median | in flight after | "
        "pool blocks held / free after |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['sent']} | {result['answered']} | {result['refused']} | {result['lost']} | "
        f"{result['tokens_per_s']:.1f} | {100 * low:+.1f}% / {100 * high:+.1f}% | {result['in_flight_after']:.0f} | "
        f"{result['blocks_held_after']:.0f} / {result['blocks_free_after']:.0f} |",
        "",
        f"Server RSS, median per minute (MiB): {by_minute}. Warm-up (not in the band): the first "
        f"{result['warmup_s']:.0f} s." + (f" First loss: {result['first_error']}" if result["first_error"] else ""),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-memory", default="48MiB")
    args = parser.parse_args()
    result = run(args.seconds, args.concurrency, args.new_tokens, args.kv_memory)
    write_result(RESULTS, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
