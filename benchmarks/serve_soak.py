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


def server_command(kind: str, folders: dict[str, Path], kv_memory: str) -> tuple[list[str], Path]:
    """``hf-vram serve`` (int8 weights and K/V pages), or ``transformers serve`` on the float checkpoint with the
    bfloat16 pages the same budget holds (the soak's baseline: what growth is the ecosystem's own)."""
    common = ["--continuous-batching", "--dtype", "bfloat16"]
    if kind == "transformers":
        from serve_load import kv_blocks

        from hf_vram.config.checks import parse_bytes

        blocks = kv_blocks(folders["plain"], parse_bytes(kv_memory))
        cmd = [str(BIN / "transformers"), "serve", str(folders["plain"]), "--cb-num-blocks", str(blocks)]
        return cmd + common, folders["plain"]
    cmd = [str(BIN / "hf-vram"), "serve", str(folders["int8"]), "--kv-bits", "8", "--kv-memory", kv_memory]
    return cmd + common, folders["int8"]


def run(seconds: float, concurrency: int, new_tokens: int, kv_memory: str, kind: str = "hf-vram") -> dict:
    from hf_vram.serving.soak import soak

    with tempfile.TemporaryDirectory() as tmp:
        cmd, folder = server_command(kind, prepare(Path(tmp)), kv_memory)
        server = Server(cmd)
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
        "server": kind,
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


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def tables(result: dict) -> list[str]:
    """The BENCHMARKS.md section of the soaks (``runs``: one per server)."""
    runs = result["runs"]
    first = runs[0]
    lines = [
        "### A soak at steady load (`benchmarks/serve_soak.py`)",
        "",
        f"Run {first['date']} on {result['machine']}. SmolLM2: `hf-vram serve` with int8 weights and int8 K/V pages in "
        f"{first['kv_memory']}, and `transformers serve` (float weights, bfloat16 pages in the same budget), both "
        f"with continuous batching; {first['concurrency']} `openai` clients each streaming one chat request after "
        f"another ({first['new_tokens']} new tokens, greedy). RSS: the server process and its children, sampled "
        "every second; the band is after the warm-up (the first fifth), relative to its median. Pool: read from the "
        "continuous-batching cache through `/metrics` after the last answer (`transformers serve` has none)."
        + (f" {result['note']}" if result.get("note") else ""),
        "",
        "| server | seconds | sent | answered | 429 | lost | tokens/s | RSS band min / max | RSS MiB per minute "
        "| growth MiB per 100 answers | in flight after | pool blocks held / free after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        low, high = r["rss_band"]
        minutes = list(r["rss_mib_by_minute"].values())
        growth = (minutes[-1] - minutes[1]) / max(1, r["answered"]) * 100 if len(minutes) > 2 else float("nan")
        lines.append(
            f"| {r['server']} | {r['seconds']:.0f} | {r['sent']} | {r['answered']} | {r['refused']} | {r['lost']} | "
            f"{r['tokens_per_s']:.1f} | {100 * low:+.1f}% / {100 * high:+.1f}% | "
            + " / ".join(f"{v:.0f}" for v in minutes)
            + f" | {growth:.1f} | {_count(r['in_flight_after'])} | {_count(r['blocks_held_after'])} / "
            f"{_count(r['blocks_free_after'])} |"
        )
    losses = [f"{r['server']}: {r['first_error']}" for r in runs if r["first_error"]]
    return lines + [""] + ([f"First loss: {e}" for e in losses] + [""] if losses else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-memory", default="48MiB")
    parser.add_argument("--server", choices=("hf-vram", "transformers"), default="hf-vram")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run_result = run(args.seconds, args.concurrency, args.new_tokens, args.kv_memory, args.server)
    previous = json.loads(args.out.read_text()).get("runs", []) if args.out.is_file() else []
    runs = [r for r in previous if r["server"] != args.server] + [run_result]
    write_result(args.out, {"runs": sorted(runs, key=lambda r: r["server"] != "hf-vram")})
    print(json.dumps(run_result, indent=1))


if __name__ == "__main__":
    main()
