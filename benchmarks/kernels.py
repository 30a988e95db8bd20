"""Matrix-vector kernels on SmolLM2's shapes, alone and inside a whole decode step (CPU, 2 threads).

Writes ``benchmarks/results/kernels.json``. Usage: ``python benchmarks/kernels.py``.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import results_path  # noqa: E402

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


def _shape_row(n_out: int, k: int) -> dict:
    from hf_vram.kernels import cpu
    from hf_vram.quant import schemes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, k, generator=g) * 0.05
    x = torch.randn(1, k, generator=g)
    wb, xb = w.bfloat16(), x.bfloat16()
    q, s = schemes.quantize_int8(w)
    packed4, sz = schemes.quantize_int4(w, 64, scale_search="none")
    p4 = cpu.int4_to_cpu_layout(schemes.unpack_int4(packed4))
    fb = cpu.w8a8_pack(q, s)
    reps = 20 if n_out > 10000 else 300
    return {
        "shape": f"{k} x {n_out}",
        "fp32": _time_us(lambda: x @ w.t(), reps),
        "bf16": _time_us(lambda: xb @ wb.t(), reps),
        "int8 packed (bf16 act.)": _time_us(lambda: cpu.int8_packed_matmul(x, q, s, torch.bfloat16), reps),
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


def main() -> None:
    torch.set_num_threads(2)
    result = {"isolated_us": isolated(), "decode_step_ms": decode_step()}
    path = results_path("kernels")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
