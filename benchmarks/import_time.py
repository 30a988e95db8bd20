"""Import time of hf_vram against Transformers' own, each in fresh processes, alternating (CPU).

Target (issue 14): ``import hf_vram`` at most 1.3x ``from transformers import AutoModelForCausalLM``, with nothing
printed. Usage: ``python benchmarks/import_time.py [--repeats 7]``; writes ``benchmarks/results/<family>/import_time.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, results_path, versions  # noqa: E402

STATEMENTS = {
    "from transformers import AutoModelForCausalLM": "from transformers import AutoModelForCausalLM",
    "import hf_vram": "import hf_vram",
    "import hf_vram, then hf_vram.DistillationCallback (Trainer, PEFT)": "import hf_vram; hf_vram.DistillationCallback",
}
TARGET = 1.3


def one(statement: str) -> tuple[float, str]:
    """Seconds the statement takes in a fresh interpreter (start-up excluded), and what it printed."""
    code = f"import time\nt = time.perf_counter()\n{statement}\nprint('SECONDS', time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{statement!r} failed: {proc.stderr[-2000:]}")
    seconds = float(proc.stdout.split("SECONDS")[-1])
    printed = (proc.stdout.split("SECONDS")[0] + proc.stderr).strip()
    return seconds, printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    one("import hf_vram")  # warm the file cache once
    samples: dict[str, list[float]] = {label: [] for label in STATEMENTS}
    printed: dict[str, str] = {}
    for _ in range(args.repeats):
        for label, statement in STATEMENTS.items():
            seconds, out = one(statement)
            samples[label].append(seconds)
            printed[label] = out
    rows = [
        {"statement": label, "median_s": statistics.median(s), "min_s": min(s), "printed": printed[label]}
        for label, s in samples.items()
    ]
    result = {
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "rows": rows,
    }
    path = results_path("import_time")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print("\n".join(tables(result)))


def tables(result: dict) -> list[str]:
    base = result["rows"][0]["median_s"]
    lines = [
        "### Import time (`benchmarks/import_time.py`)",
        "",
        f"Run {result['date']}: each statement in a fresh interpreter, interpreter start-up excluded, median of "
        f"{result['repeats']} alternating runs. Target: `import hf_vram` at most {TARGET}x Transformers' own import.",
        "",
        "| statement | median s | min s | x transformers | prints |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        shown = r["printed"].splitlines()[0][:80] if r["printed"] else "nothing"
        lines.append(f"| `{r['statement']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['median_s'] / base:.2f}x | {shown} |")
    return lines + [""]


if __name__ == "__main__":
    main()
