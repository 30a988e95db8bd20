"""Matrix-vector kernels on SmolLM2's shapes, alone and inside a whole decode step, and the dispatch crossovers
(CPU, 2 threads).

The crossover part times, per torch CPU path this machine can take (each in a subprocess with
``ATEN_CPU_CAPABILITY``), torch's packed int8/int4 kernels against dequantize + float32 matmul over the seven
projection shapes of one SmolLM2 layer, for growing row counts; the thresholds in
``hf_vram.kernels.dispatch.CPU_THRESHOLDS`` are read from it. A last column times the int8 dequantizing path with
a bfloat16 matmul instead: where the CPU has no native bf16 (``dispatch.dequant_dtype``), float32 is the faster.
'int8 hf_vram' is hf_vram's own kernel (``kernels/int8_weight_matmul``, bfloat16 activations): its BF16-dot loops on
an AVX-512 path where the CPU has AVX512-BF16 (the only place dispatch takes it), its float32 loops elsewhere.
Writes ``benchmarks/results/<family>/kernels.json``. Named ``kernel_speed`` and not ``kernels``: a script's folder comes first
on ``sys.path``, and a ``kernels.py`` there hid the ``kernels`` package Transformers 5.25 imports from every script in it.
Usage: ``python benchmarks/kernel_speed.py [--crossover-only]``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import emit, machine, results_path, run_child, versions  # noqa: E402

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
CROSSOVER_ROWS = [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 512, 1024]

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576)]


def _time_us(fn, n: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def isolated() -> list[dict]:
    return [_shape_row(n_out, k) for n_out, k in SHAPES]


def _hf_vram_int8(fn, reps: int) -> dict:
    """The 'int8 hf_vram' column: hf_vram's kernel where it builds (no compiler: no column)."""
    from hf_vram.kernels import cpu_extension

    return {"int8 hf_vram": _time_us(fn, reps)} if cpu_extension.load() else {}


def _shape_row(n_out: int, k: int) -> dict:
    from hf_vram.kernels import cpu
    from hf_vram.kernels.int8_weight_matmul import int8_weight_matmul
    from hf_vram.quant import schemes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, k, generator=g) * 0.05
    x = torch.randn(1, k, generator=g)
    wb, xb = w.bfloat16(), x.bfloat16()
    q, s = schemes.quantize_int8(w)
    packed4, sz = schemes.quantize_int4(w, 64, scale_search="none")
    p4 = cpu.int4_to_cpu_layout(schemes.unpack_int4(packed4))
    fb = cpu.w8a8_pack(q, s)
    sb = s.bfloat16()
    reps = 20 if n_out > 10000 else 300
    return {
        "shape": f"{k} x {n_out}",
        "fp32": _time_us(lambda: x @ w.t(), reps),
        "bf16": _time_us(lambda: xb @ wb.t(), reps),
        "int8 packed (bf16 act.)": _time_us(lambda: cpu.int8_packed_matmul(x, q, sb, torch.bfloat16), reps),
        **_hf_vram_int8(lambda: int8_weight_matmul(xb, q, sb), reps),
        "int4 packed g64 (bf16 act.)": _time_us(lambda: cpu.int4_packed_matmul(x, p4, sz, 64, torch.bfloat16), reps),
        "w8a8 FBGEMM": _time_us(lambda: cpu.w8a8_matmul(x, fb), reps),
    }


@torch.inference_mode()
def decode_step() -> dict:
    """Milliseconds per cached decode step of the whole model, 128 tokens of context."""
    import hf_vram
    from hf_vram.assets import load_smollm2

    model, _ = load_smollm2()
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    for preset in ("int8", "int4", "w8a8"):
        cfg = hf_vram.VramOptimizationConfig.from_preset(preset)
        cfg.quantization.calibration = "none"  # speed does not depend on the scales' values
        variants[preset] = hf_vram.optimize(copy.deepcopy(model), cfg)
    ids = torch.randint(100, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, m in variants.items():
        first = m(ids, use_cache=True)
        cache, nxt = first.cache, ids[:, -1:]
        for _ in range(3):
            m(nxt, cache=cache, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(20):
            m(nxt, cache=cache, use_cache=True)
        out[name] = (time.perf_counter() - t0) / 20 * 1e3
    return out


def crossover() -> dict:
    """Microseconds per layer's seven matmuls, by rows: packed kernels against dequantize + float32 matmul."""
    from hf_vram.kernels import cpu
    from hf_vram.kernels.cpu_caps import torch_capability
    from hf_vram.kernels.dispatch import NATIVE_HALF, int8_dequant_matmul
    from hf_vram.kernels.int8_weight_matmul import int8_weight_matmul
    from hf_vram.quant import schemes

    g = torch.Generator().manual_seed(0)
    layer = []
    for n, k in LAYER_SHAPES:
        w = torch.randn(n, k, generator=g) * 0.05
        q, s = schemes.quantize_int8(w)
        packed, sz = schemes.quantize_int4(w, 128, scale_search="none")
        layer.append((k, q, s, s.bfloat16(), cpu.int4_to_cpu_layout(schemes.unpack_int4(packed)), sz))
    rows = []
    for m in CROSSOVER_ROWS:
        widths = {k for k, *_ in layer} | {schemes.padded_in_features(k, 128) for k, *_ in layer}
        xs = {k: torch.randn(m, k, generator=g) for k in widths}
        halves = {k: x.bfloat16() for k, x in xs.items()}
        reps = max(2, min(200, 2000 // m))

        def int8_packed(xs=xs):
            for k, q, _, sb, _, _ in layer:
                cpu.int8_packed_matmul(xs[k], q, sb, torch.bfloat16)

        def int8_dequant(xs=xs):
            for k, q, s, *_ in layer:
                int8_dequant_matmul(xs[k], q, s)

        def int8_dequant_bf16(halves=halves):  # what a bfloat16 matmul would cost there (dispatch.dequant_dtype)
            for k, q, _, sb, _, _ in layer:
                int8_dequant_matmul(halves[k], q, sb)

        def int8_hf_vram(halves=halves):
            for k, q, _, sb, _, _ in layer:
                int8_weight_matmul(halves[k], q, sb)

        def int4_packed(xs=xs):  # inputs zero-padded to whole groups of 128, as Int4Linear does
            for k, *_, p4, sz in layer:
                cpu.int4_packed_matmul(xs[schemes.padded_in_features(k, 128)], p4, sz, 128, torch.bfloat16)

        def int4_dequant(xs=xs):
            for k, *_, p4, sz in layer:
                xs[schemes.padded_in_features(k, 128)] @ cpu.int4_dequantize_cpu_layout(p4, sz, torch.float32).t()

        rows.append(
            {
                "rows": m,
                "int8 packed": _time_us(int8_packed, reps),
                "int8 dequant + fp32": _time_us(int8_dequant, reps),
                "int4 packed": _time_us(int4_packed, reps),
                "int4 dequant + fp32": _time_us(int4_dequant, reps),
                "int8 dequant + bf16": _time_us(int8_dequant_bf16, reps),
                **_hf_vram_int8(int8_hf_vram, reps),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    # int8 against the dequantizing path dispatch takes here: bfloat16 where the CPU multiplies it natively
    against = "int8 dequant + bf16" if torch.bfloat16 in NATIVE_HALF else "int8 dequant + fp32"
    packed_max = max([r["rows"] for r in rows if r["int8 packed"] <= r[against]], default=0)
    int4_min = min([r["rows"] for r in rows if r["int4 dequant + fp32"] < r["int4 packed"]], default=10**9)
    ours = [r["rows"] for r in rows if "int8 hf_vram" in r and r["int8 hf_vram"] <= min(r["int8 packed"], r[against])]
    return {
        "capability": torch_capability(),
        "machine": machine(),
        "columns": list(rows[0])[1:],
        "rows": rows,
        "chosen": {
            "packed_max_rows": packed_max,
            "int4_dequant_min_rows": int4_min,
            "hf_vram_int8_max_rows": max(ours, default=0),
        },
        "int8_against": against,
    }


def crossovers_on_every_path() -> list[dict]:
    from hf_vram.kernels.cpu_caps import reachable_capabilities

    out = []
    for cap in reachable_capabilities():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        out.append(run_child([__file__, "--crossover-one"], env=env, fallback={"capability": cap}))
    return out


def main() -> None:
    torch.set_num_threads(2)
    if "--crossover-one" in sys.argv:
        emit(crossover())
        return
    path = results_path("kernels")
    if "--crossover-only" in sys.argv and path.is_file():
        result = json.loads(path.read_text())
        result["crossover"] = crossovers_on_every_path()
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["crossover"], indent=1))
        return
    result = {
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "isolated_us": isolated(),
        "decode_step_ms": decode_step(),
        "crossover": crossovers_on_every_path(),
    }
    path = results_path("kernels")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
