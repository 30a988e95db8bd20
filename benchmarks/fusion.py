"""Fusion benchmark on SmolLM2-135M-Instruct (CPU): attention memory and time by sequence length, fused modules.

Attention rows: one forward (batch 1, last-token logits) per attention implementation and length, each in a fresh
process; reported are the peak-memory tracker's number (live tensor bytes allocated during the forward, what the
model code allocates; kernel-internal scratch is not seen) and the growth of the process's peak RSS over its RSS
before the forward (everything, including allocator caching). A padded batch (2 x 4096, one row a quarter padding)
shows the mask cost. Fused-module rows: decode tokens/s and the tracker's peak of a 512-token forward, with and
without fused norms + projections (attention SDPA in both, to isolate them). Writes ``benchmarks/results/fusion.json``.
Usage: ``python benchmarks/fusion.py``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import emit, machine, results_path, run_child, versions  # noqa: E402

RESULTS = results_path("fusion")
LENGTHS = {"eager": (1024, 2048, 4096), "sdpa": (1024, 2048, 4096, 8192, 16384), "hf_vram": (1024, 2048, 4096, 8192, 16384)}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _model(attention: str, fused_modules: bool = False):
    from transformers import AutoModelForCausalLM

    import hf_vram
    from hf_vram.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    if attention == "hf_vram" or fused_modules:
        section = {"enabled": True, "norms": fused_modules, "projections": fused_modules, "attention": attention}
        hf_vram.optimize(model, {"fusion": section})
    else:
        model.set_attn_implementation(attention)
    return model


def one_attention(attention: str, length: int, padded: bool) -> dict:
    from transformers import AutoTokenizer

    from hf_vram import track_peak_memory
    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import token_stream

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    stream = token_stream(tok, pydoc_text(), 2 * length)
    model = _model(attention)
    if padded:
        ids = stream.view(2, length)
        mask = torch.ones_like(ids)
        mask[1, : length // 4] = 0
    else:
        ids, mask = stream[None, :length], None
    with torch.inference_mode():
        model(ids[:, :64], attention_mask=None if mask is None else mask[:, :64], logits_to_keep=1)  # warm-up
        rss_before = _rss_kib()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with track_peak_memory() as peak:
            model(ids, attention_mask=mask, logits_to_keep=1)
        seconds = time.perf_counter() - t0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "attention": attention,
        "length": length,
        "padded": padded,
        "tracker_mib": peak.peak_mib,
        "rss_growth_mib": max(peak_after - max(peak_before, rss_before), 0) / 1024,
        "seconds": seconds,
    }


def fused_modules_rows() -> list[dict]:
    from transformers import AutoTokenizer

    from hf_vram import track_peak_memory
    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import decode_speed, token_stream

    torch.set_num_threads(2)
    ids = token_stream(AutoTokenizer.from_pretrained(smollm2_path()), pydoc_text(), 512)
    rows = []
    for fused in (False, True):
        model = _model("sdpa", fused_modules=fused)
        with torch.inference_mode(), track_peak_memory() as peak:
            model(ids[None], logits_to_keep=1)
        rows.append(
            {
                "fused_modules": fused,
                "decode_tok_s": decode_speed(model, ids[:128], new_tokens=64, repeats=5),
                "forward_512_peak_mib": peak.peak_mib,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:

    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        emit(one_attention(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "padded"))
        return
    result = {"machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "attention": []}
    jobs = [(a, n, "plain") for a, ns in LENGTHS.items() for n in ns]
    jobs += [(a, 4096, "padded") for a in ("sdpa", "hf_vram")]
    for attention, length, kind in jobs:
        who = {"attention": attention, "length": length, "padded": kind == "padded"}
        row = run_child([__file__, "--one", attention, str(length), kind], fallback=who)
        result["attention"].append(row)
        print(json.dumps(row), flush=True)
    result["fused_modules"] = fused_modules_rows()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))


def tables(result: dict) -> list[str]:
    lines = [
        "## Fusion on SmolLM2-135M-Instruct (`benchmarks/fusion.py`, CPU)",
        "",
        f"Run {result['date']} on {result['machine']}. One forward, batch 1, last-token logits, each in a fresh "
        "process. Tracker: peak live tensor bytes allocated by the forward (kernel-internal scratch not seen). "
        "RSS: growth of the process's peak resident memory during the forward.",
        "",
        "| attention | tokens | tracker peak MiB | RSS growth MiB | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in result["attention"]:
        label = r["attention"] + (" (batch 2, one row 25% padded)" if r.get("padded") else "")
        if "error" in r:
            lines.append(f"| {label} | {r['length']} | failed: {r['error'][:100]} | | |")
            continue
        lines.append(f"| {label} | {r['length']} | {r['tracker_mib']:.1f} | {r['rss_growth_mib']:.1f} | {r['seconds']:.2f} |")
    lines += [
        "",
        "Both SDPA and hf_vram run torch's flash kernel on a plain causal call (hf_vram with GQA K/V unexpanded), so "
        "their tracker peaks match; hf_vram's saving appears with padding or a sliding window, where SDPA builds the "
        "whole [batch, 1, q, kv] mask and hf_vram builds it a chunk of rows at a time. Times are single runs on a "
        "shared 2-core VM whose speed swings between processes; read them with that noise in mind.",
    ]
    rows = {r["fused_modules"]: r for r in result["fused_modules"]}
    if True in rows and False in rows:
        a, b = rows[False], rows[True]
        lines += [
            "",
            "Fused norms + fused qkv / gate-up projections (attention SDPA in both): decode "
            f"{a['decode_tok_s']:.1f} -> {b['decode_tok_s']:.1f} tok/s ({100 * (b['decode_tok_s'] / a['decode_tok_s'] - 1):+.1f}%), "
            f"peak of a 512-token forward {a['forward_512_peak_mib']:.1f} -> {b['forward_512_peak_mib']:.1f} MiB "
            f"({100 * (b['forward_512_peak_mib'] / a['forward_512_peak_mib'] - 1):+.1f}%).",
        ]
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
