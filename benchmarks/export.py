"""Export to compressed-tensors: time, size on disk, and the exported model's quality as plain Transformers loads it.

For each configuration: quantize SmolLM2 with hf_vram, ``hf_vram.export`` it, then in a fresh process *without*
hf_vram load the folder with Transformers (compressed-tensors) and measure perplexity on the same 4096 pydoc tokens
as the hf_vram model. Usage: ``python benchmarks/export.py``; writes ``benchmarks/results/<family>/export.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import results_path, run_child, write_result  # noqa: E402

TOKENS = 4096
# name -> quantization section (group 64: SmolLM2's 576-wide inputs are not a multiple of 128)
CONFIGS = {
    "int8 (configs/int8.yaml)": "int8",
    "int4 g64 + AWQ + GPTQ": {
        "quantization": {
            "scheme": "int4",
            "group_size": 64,
            "scale_search": "clip",
            "calibration": "awq+gptq",
            "calibration_samples": 32,
            "quantize_embeddings": True,
        }
    },
    "w8a8 (configs/w8a8.yaml)": "w8a8",
}
PLAIN = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
sys.path.insert(0, sys.argv[3])
from hf_vram.evaluation import perplexity
ids = torch.load(sys.argv[2])
t0 = time.perf_counter()
kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if sys.argv[4] == "1" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, **kwargs)
load_s = time.perf_counter() - t0
ppl = perplexity(model, ids)
print("RESULT " + json.dumps({"plain_load_s": load_s, "plain_ppl": ppl, "hf_vram_imported": "hf_vram" in sys.modules}))  # common.RESULT
"""


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_vram
    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import perplexity, token_stream

    torch.set_num_threads(2)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tokenizer, pydoc_text(), TOKENS)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        torch.save(ids, Path(scratch) / "ids.pt")
        for name, config in CONFIGS.items():
            cfg = (
                hf_vram.VramOptimizationConfig.from_preset(config)
                if isinstance(config, str)
                else hf_vram.VramOptimizationConfig(**config)
            )
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg).eval()
            row = {
                "name": name,
                "quantize_s": time.perf_counter() - t0,
                "hf_vram_ppl": perplexity(model, ids),
                "hf_vram_mib": hf_vram.memory_report(model).total / 2**20,
            }
            out = Path(scratch) / name.split()[0]
            report = hf_vram.export(model, out, tokenizer=tokenizer)
            row.update(
                export_s=report.seconds,
                folder_mib=report.bytes_written / 2**20,
                float_embedding_mib=report.float_embedding_bytes / 2**20,
            )
            asym = cfg.quantization.scheme == "int4" and not cfg.quantization.symmetric
            plain = ["-c", PLAIN, str(out), str(Path(scratch) / "ids.pt"), str(ROOT), "1" if asym else "0"]
            row.update(run_child(plain, env={**os.environ, "PYTHONPATH": ""}))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    path = results_path("export")
    write_result(path, {"date": time.strftime("%Y-%m-%d"), "tokens": TOKENS, "rows": rows})
    print("\n".join(tables(json.loads(path.read_text()))))


def tables(result: dict) -> list[str]:
    lines = [
        "### Export to compressed-tensors (`benchmarks/export.py`)",
        "",
        f"Run {result['date']}. SmolLM2 quantized by hf_vram, exported with `hf_vram.export`, then loaded by plain "
        "Transformers in a fresh process without hf_vram (asymmetric int4 with `CompressedTensorsConfig(dequantize="
        "True)`: Transformers 5.24's compressed loader expects unpacked zero points) and scored on the same "
        f"{result['tokens']} pydoc tokens. The int8 embedding goes out in float (serving engines expect one).",
        "",
        "| config | quantize s | export s | folder MiB | of it: float embedding MiB | hf_vram MiB in memory | "
        "hf_vram ppl | plain Transformers ppl | plain load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['name']} | {r['quantize_s']:.0f} | {r['export_s']:.1f} | {r['folder_mib']:.1f} | | | "
                f"{r['hf_vram_ppl']:.3f} | failed: {str(r['error'])[:100]} | |"
            )
            continue
        lines.append(
            f"| {r['name']} | {r['quantize_s']:.0f} | {r['export_s']:.1f} | {r['folder_mib']:.1f} | "
            f"+{r['float_embedding_mib']:.1f} | {r['hf_vram_mib']:.1f} | {r['hf_vram_ppl']:.3f} | "
            f"{r['plain_ppl']:.3f} | {r['plain_load_s']:.1f} |"
        )
    return lines + [""]


if __name__ == "__main__":
    main()
