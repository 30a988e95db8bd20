"""Quantization benchmark: baselines, peers and hf_vram side by side on SmolLM2-135M-Instruct (CPU).

Each configuration runs in a fresh subprocess (``--one NAME``); the parent collects JSON and writes
``benchmarks/results/<family>/quantization.json`` and the table in ``BENCHMARKS.md``. A peer that fails is a row
with its error. Usage: ``python benchmarks/quantization.py [--tokens 16384] [--only 'name;name']`` (names hold
commas).

Calibration text never overlaps the evaluation tokens: every calibrated row (hf_vram's presets, llm-compressor)
calibrates on the *last* windows of the pydoc text and is scored on its first ``--tokens`` tokens; ``run_one``
asserts that the two token ranges are disjoint. llm-compressor pins an older Transformers, so its rows run in a
virtual environment this script creates (``.cache/llmcompressor-venv``), write a compressed-tensors folder, and
are then loaded and measured here exactly like every other row (Transformers reads compressed-tensors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import emit, merge_rerun, results_path, run_child, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = results_path("quantization")

CONFIGS = {
    "fp32": "baseline",
    "bf16": "baseline",
    "bitsandbytes int8 (LLM.int8)": "peer",
    "bitsandbytes nf4": "peer",
    "torchao int8 weight-only": "peer",
    "optimum-quanto int8": "peer",
    "HQQ 4-bit g64": "peer",
    "llm-compressor GPTQ W4A16 g64 symmetric": "peer",
    "llm-compressor GPTQ W4A16 g64 asymmetric": "peer",
    "hf_vram int8 (configs/int8.yaml)": "hf_vram",
    "hf_vram w8a8 + smoothing (configs/w8a8.yaml)": "hf_vram",
    "hf_vram int4 g128 + AWQ + GPTQ (configs/int4.yaml)": "hf_vram",
    "hf_vram int4 g128 + AWQ + GPTQ, no clip search": "hf_vram",
    "hf_vram int4 g128 + GPTQ": "hf_vram",
    "hf_vram int4 g128 + AWQ": "hf_vram",
    "hf_vram int4 g128, clip search": "hf_vram",
    "hf_vram int4 g128, plain min/max": "hf_vram",
    "hf_vram int4 g64 + AWQ + GPTQ": "hf_vram",
    "hf_vram int4 g64 symmetric + AWQ + GPTQ": "hf_vram",
}
# hf_vram rows: preset, then overrides of its quantization section.
HF_VRAM_ROWS = {
    "hf_vram int8 (configs/int8.yaml)": ("int8", {}),
    "hf_vram w8a8 + smoothing (configs/w8a8.yaml)": ("w8a8", {}),
    "hf_vram int4 g128 + AWQ + GPTQ (configs/int4.yaml)": ("int4", {}),
    "hf_vram int4 g128 + AWQ + GPTQ, no clip search": ("int4", {"scale_search": "none"}),
    "hf_vram int4 g128 + GPTQ": ("int4", {"calibration": "gptq"}),
    "hf_vram int4 g128 + AWQ": ("int4", {"calibration": "awq"}),
    "hf_vram int4 g128, clip search": ("int4", {"calibration": "none", "scale_search": "clip"}),
    "hf_vram int4 g128, plain min/max": ("int4", {"calibration": "none", "scale_search": "none"}),
    "hf_vram int4 g64 + AWQ + GPTQ": ("int4", {"group_size": 64}),
    "hf_vram int4 g64 symmetric + AWQ + GPTQ": ("int4", {"group_size": 64, "symmetric": True}),
}
# llm-compressor rows: (group, symmetric); calibrated on LLMC_WINDOWS windows of 512 tokens, as measured in issue 17.
LLMC_ROWS = {"llm-compressor GPTQ W4A16 g64 symmetric": (64, True), "llm-compressor GPTQ W4A16 g64 asymmetric": (64, False)}
LLMC_WINDOWS = 64
LLMC_VENV = ROOT / ".cache" / "llmcompressor-venv"
LLMC_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]


def _tensor_bytes(model) -> int:
    """Every storage reachable from parameters, buffers and quantization-state attributes, counted once."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and hasattr(t, "__tensor_flatten__"):  # tensor subclasses (torchao)
            for inner in t.__tensor_flatten__()[0]:
                add(getattr(t, inner))
            return
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for module in model.modules():
        extra = getattr(module, "extra_storage", None)
        if extra is not None:  # hf_vram's kernel-owned storage (FBGEMM packed weights, kernel-dtype scales)
            total += sum(nbytes for _, _, nbytes in extra())
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            add(t)
            state = getattr(t, "quant_state", None)
            if state is not None:
                for v in vars(state).values():
                    add(v)
                    if hasattr(v, "__dict__"):
                        for w in vars(v).values():
                            add(w)
        for v in vars(module).values():
            if isinstance(v, dict):
                for w in v.values():
                    add(w)
    return total


def _load(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_vram
    from hf_vram.assets import smollm2_path

    path = smollm2_path()
    t0 = time.perf_counter()
    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif name == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif name.startswith("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        q = (
            BitsAndBytesConfig(load_in_8bit=True)
            if "int8" in name
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=q)
    elif name.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        )
    elif name.startswith("optimum-quanto"):
        from transformers import QuantoConfig

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=QuantoConfig(weights="int8"))
    elif name in LLMC_ROWS:
        from transformers import CompressedTensorsConfig

        folder = _llmcompressor_folder(name)
        # Transformers 5.24's compressed loader cannot take packed asymmetric zero points (it expects unpacked ones
        # and refuses the shapes): the asymmetric folder is decompressed at load, the symmetric one runs compressed.
        kwargs = {} if LLMC_ROWS[name][1] else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    elif name.startswith("HQQ"):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        AutoHQQHFModel.quantize_model(
            model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
        )
    else:
        preset, overrides = HF_VRAM_ROWS[name]
        cfg = hf_vram.VramOptimizationConfig.from_preset(preset)
        for key, value in overrides.items():
            setattr(cfg.quantization, key, value)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    return model.eval(), time.perf_counter() - t0


def _llmcompressor_folder(name: str) -> Path:
    """Quantize SmolLM2 with llm-compressor in its own venv (created on first use); returns the compressed folder."""
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.data import calibration_ids

    group, symmetric = LLMC_ROWS[name]
    out = ROOT / ".cache" / "llmcompressor" / f"g{group}-{'sym' if symmetric else 'asym'}"
    if (out / "config.json").is_file():
        return out
    python = LLMC_VENV / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        for package in LLMC_PACKAGES:  # torch first: the CPU build; an unpinned one would pull CUDA
            subprocess.run([str(python), "-m", "pip", "install", "-q", package, "gguf"], check=True)
    ids = calibration_ids(AutoTokenizer.from_pretrained(smollm2_path()), pydoc_text(), LLMC_WINDOWS, 512, from_end=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_file = out.parent / f"{out.name}-ids.pt"
    import torch

    torch.save(ids, torch_file)
    script = ROOT / "benchmarks" / "peers" / "llmcompressor_gptq.py"
    args = [str(script), str(smollm2_path()), str(out), "--group", str(group), "--symmetric", str(symmetric).lower()]
    result = run_child([*args, "--windows", str(torch_file)], python=str(python))
    if "error" in result:
        raise RuntimeError(f"llm-compressor failed: {result['error']}")
    (out / "hf_vram_benchmark.json").write_text(json.dumps(result))
    return out


def run_one(name: str, n_tokens: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import decode_speed, greedy_tokens, perplexity, prefill_seconds, token_stream

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    ids = token_stream(tok, pydoc_text(), n_tokens)
    _check_disjoint(tok, n_tokens)
    model, load_s = _load(name)
    row = {"name": name, "kind": CONFIGS[name], "load_s": round(load_s, 2), "weight_mib": _tensor_bytes(model) / 2**20}
    if name in LLMC_ROWS:  # its own quantization time, from its own process
        row["quantize_s"] = json.loads((_llmcompressor_folder(name) / "hf_vram_benchmark.json").read_text())["quantize_s"]
        if not LLMC_ROWS[name][1]:  # loaded decompressed: count its quantized layers as the checkpoint holds them
            row["weight_mib"] = _compressed_bytes(model, _llmcompressor_folder(name)) / 2**20
    row["ppl"] = perplexity(model, ids)
    row["decode_tok_s"] = decode_speed(model, ids[:128], new_tokens=64, repeats=3)
    row["prefill_512_s"] = prefill_seconds(model, ids[:512])
    row["greedy_30"] = greedy_tokens(model, ids[:128], 30)
    return row


def _compressed_bytes(model, folder: Path) -> int:
    """The model's bytes with each compressed-tensors layer counted as stored (packed codes, scales, zero points)
    instead of the float weight it was decompressed into."""
    from safetensors import safe_open

    total = _tensor_bytes(model)
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(".weight_packed"):
                    total -= model.get_submodule(key.removesuffix(".weight_packed")).weight.nbytes
                if key.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")):
                    total += f.get_tensor(key).nbytes
    return total


def _check_disjoint(tok, n_tokens: int) -> None:
    """The evaluation tokens (the first ``n_tokens``) and every calibration window (the last ones) never overlap."""
    from hf_vram.assets import pydoc_text

    total = tok(pydoc_text(), add_special_tokens=False, return_tensors="pt").input_ids.shape[1]
    largest = LLMC_WINDOWS * 512  # the most any row calibrates on (llm-compressor; hf_vram's presets use <= 32)
    assert n_tokens + largest <= total, f"calibration ({largest} tokens) would overlap the evaluation ({n_tokens})"


def table(rows: list[dict]) -> str:
    base = {r["name"]: r for r in rows if "error" not in r}
    bf16 = base.get("bf16", {})
    fp32 = base.get("fp32", {})
    lines = [
        "| config | weight MiB | ppl | ppl vs fp32 | decode tok/s | × bf16 decode | prefill 512 tok, s | greedy tokens equal to fp32 (of 30) | load s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:160]} | | | | | | | |")
            continue
        same = sum(a == b for a, b in zip(r.get("greedy_30", []), fp32.get("greedy_30", []), strict=False))
        same = r.get("greedy_equal", same)
        rel = f"{100 * (r['ppl'] / fp32['ppl'] - 1):+.2f}%" if fp32 else ""
        speed = f"{r['decode_tok_s'] / bf16['decode_tok_s']:.2f}×" if bf16 else ""
        mark = " †" if r.get("second_run") else " ‡" if r.get("rerun") else ""
        lines.append(
            f"| {r['name']}{mark} | {r['weight_mib']:.1f} | {r['ppl']:.3f} | {rel} | {r['decode_tok_s']:.1f} | {speed} | "
            f"{r['prefill_512_s']:.2f} | {same} | {r['load_s']:.1f}"
            + (f" (+{r['quantize_s']:.0f} quantizing in its own process)" if "quantize_s" in r else "")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--only", default="")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(args.one, args.tokens))
        return
    names = [n for n in CONFIGS if not args.only or n in args.only.split(";")]
    rows = []
    for name in names:
        t0 = time.time()
        rows.append(
            run_child([__file__, "--one", name, "--tokens", str(args.tokens)], fallback={"name": name, "kind": CONFIGS[name]})
        )
        print(f"{name}: {time.time() - t0:.0f}s", rows[-1].get("error", ""), flush=True)
    if args.only:
        rows = [r for r in merge_rerun(RESULTS, rows) if r["name"] in CONFIGS]
        rows.sort(key=lambda r: list(CONFIGS).index(r["name"]))  # rows of renamed or removed configs are dropped
    note = json.loads(RESULTS.read_text()).get("note") if args.only and RESULTS.is_file() else None
    write_result(
        RESULTS, {**({"note": note} if note else {}), "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    )
    print(table(rows))


if __name__ == "__main__":
    main()
