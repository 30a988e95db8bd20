"""One call proves the CUDA paths: every Triton kernel against its torch reference, timed against cuBLAS/SDPA and
the CUDA peers, and each preset measured for VRAM, logits error and decode speed on random weights at real shapes.

    bash benchmarks/gpu_check.sh        # the device call (see there): carried wheels, then this script
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run [--out FILE]   # CPU: tiny shapes and model

Time budget on an H100/H200 (under 9 minutes in all; the script stops itself before ``--deadline`` seconds, 460 from
``gpu_check.sh``, with whatever parts finished written). Seen on the first H200 run (2026-12-04): one 400 s call
finished the kernels and batching parts and 5 of the models part's 12 rows; a second call's 154 s took 7 model rows.
The split-K and flash-decoding A/B rows came after that run (not yet timed), so expect a second call with
``--parts models`` to finish the models part:

* setup (``gpu_check.sh``): the carried wheels (Transformers 5.24, bitsandbytes, torchao) installed with
  ``--no-index`` into their own folder, about 20 s; no model weights travel;
* part 1, correctness: 6 kernels x 3 shape sets (the tests', SmolLM2's, a 7B-class: 4096/11008/14336, GQA 32/8)
  x fp16/bf16 against ``hf_vram.kernels.reference`` and the kernels' own references, about 40 s (Triton compiles);
* part 2, speed: median of CUDA-event timings of each kernel against cuBLAS (``F.linear`` on the dequantized fp16
  weight) or SDPA, and the peers on the same shapes (bitsandbytes int8/nf4, torchao int8/int4 weight-only), 60 s;
* part 3, models: seeded random Llamas at SmolLM2-135M's shapes and a 7B-class's (2 layers), in fp16 and with each
  preset (int8, int4, w8a8, fused, serving): the memory the loaded model holds, the load's peak (fp32 init and
  quantization's transients), the peaks of a 4096-token prefill and of 256 decoded tokens, the logits' relative
  error against the fp16 model over 512 tokens, decode tokens/s eager and compiled (static cache), about 4 minutes;
* part 4, continuous batching: ``generate_batch`` of 16 requests at SmolLM2's shapes with K/V in the model's dtype
  and in hf_vram's int8 and int4 pages, the pages' decodes attended by the Triton kernel and by torch ops (tokens/s,
  and the kernel's tokens equal to torch's), about 40 s (run before part 3);
* a later short call can finish what a deadline cut: ``--parts models [--model-shapes "7b-class x2 layers,smollm2"]`` reruns those
  parts and keeps the others from the earlier results on the same card (each part's run time is recorded); rows are
  written as they are measured, so a part the deadline stops keeps its finished rows;
* the results: ``benchmarks/results/gpu.json`` (card, driver, versions, where Transformers was loaded from) and,
  through ``write_benchmarks_md.py``, the GPU section of BENCHMARKS.md.

``--dry-run`` runs the same code on the CPU under ``TRITON_INTERPRET=1`` with tiny shapes and a tiny Llama (memory
from hf_vram's tracker instead of CUDA's counters), so CI proves the script itself; it prints the tables it would
fill and writes to ``--out`` (never to the committed results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS_ROOT, versions  # noqa: E402

# (M, N, K) for the matmuls, per shape set; attention: (batch, q heads, kv heads, q len, kv len, head dim).
SHAPES = {
    "tests": {"mm": [(1, 64, 32), (17, 130, 256), (40, 33, 200)], "attn": [(2, 4, 2, 33, 33, 16)]},
    "smollm2": {
        "mm": [(1, 1536, 576), (1, 576, 1536), (512, 1536, 576), (1, 49152, 576)],
        "attn": [(1, 9, 3, 512, 512, 64), (8, 9, 3, 1, 512, 64)],
    },
    "7b": {
        "mm": [(1, 11008, 4096), (1, 4096, 14336), (1024, 14336, 4096)],
        "attn": [(1, 32, 8, 2048, 2048, 128), (16, 32, 8, 1, 4096, 128)],
    },
}
DRY_SHAPES = {
    "tests": SHAPES["tests"],
    "tiny": {
        "mm": [(1, 48, 64), (5, 32, 96), (1, 40, 1024)],
        "attn": [(1, 4, 2, 9, 9, 16), (2, 4, 2, 1, 40, 16), (2, 4, 2, 1, 160, 16)],
    },
}
PRESETS = ("int8", "int4", "w8a8", "fused", "serving")
PARTS = ("kernels", "batching", "models")


class Deadline(Exception):
    """The time budget ran out; the parts done so far are kept."""


class Check:
    def __init__(self, dry: bool, deadline_s: float, out: Path | None = None, model_shapes: list[str] | None = None):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.result: dict = {"dry_run": dry, "parts": {}}
        self.model_shapes = model_shapes or []  # the models part's shapes, in order (empty: all)
        self.out = out

    def save(self) -> None:
        """Write the results so far: after every model or batching row, so a hard timeout loses at most one row."""
        self.result["elapsed_s"] = time.perf_counter() - self.start
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.result, indent=1, default=str))

    def check_time(self) -> None:
        if time.perf_counter() - self.start > self.deadline_s:
            raise Deadline

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def time_ms(self, fn, repeats: int = 20) -> float:
        """Median milliseconds of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""
        fn()
        self.sync()
        samples = []
        for _ in range(3 if self.dry else repeats):
            if self.dry:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
            else:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(stop))
        return statistics.median(samples)


# -- part 1 and 2: kernels ------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def kernel_cases(check: Check, shape_sets: dict, dtypes, rows: list[dict]) -> None:
    """One row per kernel, shape and dtype into ``rows``: max relative error against the reference, time against the
    baseline."""
    g = torch.Generator().manual_seed(0)
    for set_name, shapes in shape_sets.items():
        for dtype in dtypes:
            tol = {torch.float16: 2e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
            for shape in shapes["mm"]:
                check.check_time()
                rows += _matmul_rows(check, set_name, shape, dtype, tol, g)
            for shape in shapes["attn"]:
                check.check_time()
                rows += _attention_rows(check, set_name, shape, dtype, tol, g)
            rows.append(_norm_row(check, set_name, shapes["mm"][0][2], dtype, tol, g))


def _unsplit(run, module):
    """``run`` with ``module``'s decode split off (its ``DECODE_PROGRAMS_PER_SM`` 0): the kernel as it was timed
    before the split, the A/B row beside the split one."""

    def unsplit():
        saved, module.DECODE_PROGRAMS_PER_SM = module.DECODE_PROGRAMS_PER_SM, 0
        try:
            return run()
        finally:
            module.DECODE_PROGRAMS_PER_SM = saved

    return unsplit


def _matmul_rows(check: Check, set_name: str, shape, dtype, tol: float, g) -> list[dict]:
    from hf_vram.kernels import triton_matmul
    from hf_vram.kernels.reference import int4_matmul_reference, int8_matmul_reference, w8a8_matmul_reference
    from hf_vram.kernels.triton_matmul import int4_matmul_triton, int8_matmul_triton, w8a8_matmul_triton
    from hf_vram.quant import schemes

    m, n, k = shape
    dev = check.device
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    q, s = schemes.quantize_int8(w)
    group = 64 if k % 64 == 0 else 32
    packed, sz = schemes.quantize_int4(w, group, scale_search="none")
    xp = F.pad(x, (0, schemes.padded_in_features(k, group) - k))
    dense = schemes.dequantize_int8(q, s).to(dtype).to(dev)
    q, s, packed, sz = q.to(dev), s.to(dev), packed.to(dev), sz.to(dev)
    cases = {
        "int8 weight-only": (lambda: int8_matmul_triton(x, q, s), lambda: int8_matmul_reference(x.float(), q, s)),
        "w8a8": (lambda: w8a8_matmul_triton(x, q, s), lambda: w8a8_matmul_reference(x.float(), q, s)),
        f"int4 g{group}": (
            lambda: int4_matmul_triton(xp, packed, sz, group),
            lambda: int4_matmul_reference(xp.float(), schemes.unpack_int4(packed), sz, group),
        ),
    }
    if triton_matmul.split_k(m, n, k, *triton_matmul._blocks(m), x.device)[0] > 1:  # the A/B of split-K
        for name in ("int8 weight-only", f"int4 g{group}"):
            cases[f"{name}, K unsplit"] = (_unsplit(cases[name][0], triton_matmul), cases[name][1])
    base_ms = check.time_ms(lambda: F.linear(x, dense))
    rows = [
        _kernel_row(check, kernel, set_name, shape, dtype, run, ref, tol, base_ms, "cuBLAS")
        for kernel, (run, ref) in cases.items()
    ]
    if not check.dry and dtype == torch.bfloat16:
        rows.append(_tinygemm_row(check, set_name, shape, xp, packed, sz, group, tol, base_ms))
    return rows + _peer_rows(check, set_name, shape, dtype, w, x, base_ms)


def _tinygemm_row(check: Check, set_name: str, shape, xp, packed, sz, group: int, tol: float, base_ms: float) -> dict:
    """hf_vram's own int4 weight through torch's CUDA tinygemm (``_weight_int4pack_mm``, torchao's int4 kernel of
    old): the same ``(q - 8) * scale + zero`` per group and the same ``[K/group, N, 2]`` scales, only the nibbles'
    order and the tiling differ. Bfloat16 only (tinygemm's one dtype). Whether routing int4 there beats the Triton
    kernel is what this row answers; nothing in hf_vram calls it yet."""
    from hf_vram.kernels.reference import int4_matmul_reference
    from hf_vram.quant import schemes

    k = xp.shape[1]
    codes = schemes.unpack_int4(packed.cpu()).to(torch.int32)  # [N, K] in 0..15
    swapped = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).to(xp.device)  # even k in the high nibble
    inner = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    row = {"kernel": f"int4 g{group} via torch tinygemm", "shapes": set_name, "shape": list(shape), "dtype": "bfloat16"}
    if inner is None:
        return row | {"error": f"K={k} is not a multiple of 32 (tinygemm's inner K tiles)"}
    try:
        tiles = torch._convert_weight_to_int4pack(swapped, inner)
        scales = sz.to(torch.bfloat16).contiguous()
        return {"peer": True} | _kernel_row(
            check,
            row["kernel"],
            set_name,
            shape,
            torch.bfloat16,
            lambda: torch._weight_int4pack_mm(xp, tiles, group, scales),
            lambda: int4_matmul_reference(xp.float(), schemes.unpack_int4(packed), sz, group),
            tol,
            base_ms,
            "cuBLAS",
        )
    except Exception as err:
        return row | {"error": f"{type(err).__name__}: {err}"[:200]}


def _attention_rows(check: Check, set_name: str, shape, dtype, tol: float, g) -> list[dict]:
    from hf_vram.kernels.triton_flash import flash_attention_triton, flash_reference
    from hf_vram.kernels.triton_paged import paged_decode_reference, paged_decode_triton

    b, hq, hkv, ql, kl, d = shape
    q, k, v = (
        torch.randn(b, h, length, d, generator=g).to(dtype).to(check.device) for h, length in ((hq, ql), (hkv, kl), (hkv, kl))
    )
    scale = d**-0.5
    base = check.time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))
    rows = [
        _kernel_row(
            check,
            "flash attention",
            set_name,
            shape,
            dtype,
            lambda: flash_attention_triton(q, k, v, scale, True),
            lambda: flash_reference(q, k, v, scale, True),
            tol,
            base,
            "SDPA",
        )
    ]
    if ql == 1:
        rows.append(_paged_row(check, set_name, (b, hq, hkv, kl, d), dtype, tol, g, paged_decode_triton, paged_decode_reference))
        rows += _page_rows_rows(check, set_name, (b, hq, hkv, kl, d), dtype, tol, g)
    return rows


def _attend_rows_reference(q, keys, values, read_index, lengths, fresh_k, fresh_v, scale) -> torch.Tensor:
    """``[S, H, G, D]`` float32: each decode attends to its rows of ``keys`` / ``values`` ``[rows, H, D]`` (already
    decoded, float32), its own new token last, as computed."""
    out, at = torch.empty(q.shape, dtype=torch.float32, device=q.device), 0
    for s, n in enumerate(lengths.tolist()):
        index = read_index[at : at + n - 1]
        k = torch.cat([keys[index], fresh_k[s : s + 1].float()]).transpose(0, 1)
        v = torch.cat([values[index], fresh_v[s : s + 1].float()]).transpose(0, 1)
        out[s] = F.scaled_dot_product_attention(q[s].float(), k, v, scale=scale)
        at += n
    return out


def _page_rows_rows(check: Check, set_name: str, shape, dtype, tol: float, g) -> list[dict]:
    """Continuous batching's decode kernel over quantized page rows (``triton_paged_rows``): ``b`` decodes of
    ``length`` keys, each in shuffled 64-row groups, int8 rows and int4 KIVI rows (keys per channel turned forward by
    RoPE); against the rows decoded by the codecs then float32 attention, timed against the torch path CUDA took
    before the kernel (every row decoded, then SDPA)."""
    from hf_vram.kernels import triton_paged_rows
    from hf_vram.kernels.triton_paged_rows import paged_decode_int8_triton, paged_decode_kivi_triton
    from hf_vram.kvcache.codec import KVCodec
    from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec
    from hf_vram.kvcache.rope_frame import RopeFrame

    b, hq, hkv, length, d = shape
    dev, scale = check.device, d**-0.5
    per_seq = -(-length // GROUP)
    groups = torch.randperm(b * per_seq, generator=g).view(b, per_seq)
    read_index = (groups[:, :, None] * GROUP + torch.arange(GROUP)).reshape(b, -1)[:, :length].reshape(-1)
    starts, lengths = torch.arange(b) * length, torch.full((b,), length)
    q = torch.randn(b, hkv, hq // hkv, d, generator=g).to(dtype)
    fresh = [torch.randn(b, hkv, d, generator=g).to(dtype) for _ in range(2)]
    keys = torch.randn(b * per_seq * GROUP, hkv, d, generator=g) * 2
    values = torch.randn(b * per_seq * GROUP, hkv, d, generator=g)
    int8 = KVCodec(8, hkv, d)
    frame = RopeFrame(1.0 / 10000 ** (torch.arange(d // 2) / (d // 2)), d)
    kivi = WindowedKVCodec(4, hkv, d, GROUP, frame)
    group_starts = torch.empty(b * per_seq, dtype=torch.long)  # each physical group's first position in its sequence
    group_starts[groups.reshape(-1)] = (torch.arange(per_seq) * GROUP).repeat(b)
    kivi_keys, kivi_values = kivi.encode(keys.view(-1, GROUP, hkv, d), values, group_starts)
    decoded = {
        "int8": (int8.decode(int8.encode(keys), torch.float32), int8.decode(int8.encode(values), torch.float32)),
        "int4": (
            kivi.decode_keys(kivi_keys, kivi_values, torch.float32, starts=group_starts),
            kivi.decode_values(kivi_values, torch.float32),
        ),
    }
    positions = (torch.arange(length)).repeat(b)
    cos, sin = (x.reshape(length, d) for x in frame.angles(torch.arange(length), torch.float32))
    no_window = torch.full_like(read_index, -1)
    on = [x.to(dev) for x in (q, *fresh, read_index, starts, lengths)]
    qd, fkd, fvd, index_d, starts_d, lengths_d = on
    int8_rows = [int8.encode(x).to(dev) for x in (keys, values)]
    kivi_rows = [kivi_keys.to(dev), kivi_values.to(dev)]
    runs = {
        "int8": lambda: paged_decode_int8_triton(qd, *int8_rows, index_d, starts_d, lengths_d, fkd, fvd, scale),
        "int4 (KIVI)": lambda: paged_decode_kivi_triton(
            qd,
            *kivi_rows,
            index_d,
            positions.to(dev),
            starts_d,
            lengths_d,
            kivi_rows[0].view(-1),
            no_window.to(dev),
            no_window.to(dev),
            cos.to(dev),
            sin.to(dev),
            fkd,
            fvd,
            scale,
            4,
            GROUP,
            kivi.code_bytes,
            kivi.key_meta_bytes,
            kivi.value_group,
            frame.pairs,
        ),  # fmt: skip
    }
    variants = [("", lambda run: run)]
    if triton_paged_rows.splits_for(b, hkv, read_index.numel(), torch.device(dev)) > 1:  # the A/B of flash-decoding
        variants.append((", rows unsplit", lambda run: _unsplit(run, triton_paged_rows)))
    rows = []
    for (name, (k, v)), (suffix, variant) in itertools.product(zip(runs, decoded.values(), strict=True), variants):
        want = _attend_rows_reference(q, k, v, read_index, lengths, *fresh, scale).to(dev)
        kd, vd = k.to(dev).to(dtype), v.to(dev).to(dtype)  # the torch path: rows decoded (here ahead), then SDPA
        dense = lambda kd=kd, vd=vd: F.scaled_dot_product_attention(  # noqa: E731
            qd.reshape(b, hq, 1, d), kd[index_d].view(b, length, hkv, d).transpose(1, 2),
            vd[index_d].view(b, length, hkv, d).transpose(1, 2), scale=scale, enable_gqa=True,
        )  # fmt: skip
        base = check.time_ms(dense)
        rows.append(
            _kernel_row(
                check,
                f"paged rows decode, {name}{suffix}",
                set_name,
                shape,
                dtype,
                variant(runs[name]),
                lambda w=want: w,
                tol,
                base,
                "SDPA on decoded rows",
            )  # fmt: skip
        )
    return rows


def _norm_row(check: Check, set_name: str, hidden: int, dtype, tol: float, g) -> dict:
    from hf_vram.kernels.triton_norm import add_rms_norm_reference, add_rms_norm_triton

    x, r = (torch.randn(8, hidden, generator=g).to(dtype).to(check.device) for _ in range(2))
    w = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype).to(check.device)
    base = check.time_ms(lambda: F.rms_norm((x + r).float(), (hidden,), eps=1e-6))
    return _kernel_row(
        check,
        "add + RMSNorm",
        set_name,
        (8, hidden),
        dtype,
        lambda: add_rms_norm_triton(x, r, w, 1e-6)[1],
        lambda: add_rms_norm_reference(x, r, w, 1e-6)[1],
        tol,
        base,
        "torch",
    )


def _kernel_row(check, kernel, set_name, shape, dtype, run, ref, tol, base_ms, baseline) -> dict:
    row = {
        "kernel": kernel,
        "shapes": set_name,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "baseline": baseline,
        "baseline_ms": base_ms,
    }
    try:
        out = run()
        check.sync()
        row["max_rel_err"] = _rel(out, ref())
        row["pass"] = row["max_rel_err"] <= tol
        row["ms"] = check.time_ms(run)
    except Exception as err:  # a kernel that fails on real hardware is a failing row, with why
        row.update({"pass": False, "error": f"{type(err).__name__}: {err}"[:300]})
    return row


def _paged_row(check, set_name, shape, dtype, tol, g, kernel, reference) -> dict:
    b, hq, hkv, length, d = shape
    block = 16
    blocks = b * (length // block + 1) + 1
    dev = check.device
    keys = torch.randn(hkv, blocks * block, d, generator=g).to(dtype).to(dev)
    values = torch.randn(hkv, blocks * block, d, generator=g).to(dtype).to(dev)
    tables = (torch.randperm(blocks - 1, generator=g)[: b * (length // block + 1)] + 1).view(b, -1).to(dev)
    lens = torch.full((b,), length, dtype=torch.int32).to(dev)
    q = torch.randn(b, hq, d, generator=g).to(dtype).to(dev)
    scale = d**-0.5
    return _kernel_row(
        check,
        "paged decode",
        set_name,
        shape,
        dtype,
        lambda: kernel(q, keys, values, tables, lens, block, scale),
        lambda: reference(q, keys, values, tables, lens, block, scale),
        tol,
        float("nan"),
        "-",
    )


def _peer_rows(check, set_name, shape, dtype, w, x, base_ms) -> list[dict]:
    """bitsandbytes and torchao on the same matmul (CUDA only: their CPU paths are other code)."""
    if check.dry:
        return []
    rows = []
    m, n, k = shape
    peers = {}
    try:
        import bitsandbytes as bnb

        lin8 = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        lin8.weight = bnb.nn.Int8Params(w.to(dtype), requires_grad=False, has_fp16_weights=False)
        peers["bitsandbytes int8"] = lin8.cuda()
        lin4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
        lin4.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4")
        peers["bitsandbytes nf4"] = lin4.cuda()
    except Exception as err:
        rows.append({"kernel": "bitsandbytes", "shapes": set_name, "shape": list(shape), "error": str(err)[:200]})
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        for name, cfg in (
            ("torchao int8 weight-only", Int8WeightOnlyConfig()),
            ("torchao int4 weight-only", Int4WeightOnlyConfig()),
        ):
            lin = torch.nn.Linear(k, n, bias=False, dtype=dtype, device="cuda")
            lin.weight.data.copy_(w.to(dtype))
            quantize_(lin, cfg)
            peers[name] = lin
    except Exception as err:
        rows.append({"kernel": "torchao", "shapes": set_name, "shape": list(shape), "error": str(err)[:200]})
    for name, layer in peers.items():
        try:
            ms = check.time_ms(lambda layer=layer: layer(x))
            rows.append(
                {
                    "kernel": name,
                    "shapes": set_name,
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": ms,
                    "baseline": "cuBLAS",
                    "baseline_ms": base_ms,
                    "peer": True,
                }
            )
        except Exception as err:
            rows.append({"kernel": name, "shapes": set_name, "shape": list(shape), "error": str(err)[:200]})
    return rows


# -- part 3: models -------------------------------------------------------------------------------------------------
# Random weights at real shapes (no model weights travel to the GPU machine): SmolLM2-135M's, and a 7B-class
# Llama-3 (hidden 4096, MLP 14336, GQA 32/8, vocab 128k) cut to 2 layers, whose memory per layer scales to 32.
# Quality is answered by the kernels' equality with their references (part 1) and, per preset, by the logits'
# relative error against the fp16 model with the same weights.
MODEL_SHAPES = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "7b-class x2 layers": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
}
DRY_MODEL_SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
}
# tokens: prefill, decoded, and the window whose logits are compared
MODEL_TOKENS = {"prefill": 4096, "decode": 256, "window": 512}
DRY_MODEL_TOKENS = {"prefill": 32, "decode": 8, "window": 32}


def random_model(check: Check, spec: dict):
    """The same seeded random Llama each call, so every preset quantizes the same weights as the fp16 reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(check.device):
        model = LlamaForCausalLM(LlamaConfig(**spec))
    return model.to(torch.float32 if check.dry else torch.float16).eval()


def release_compiled() -> None:
    """Drop what compiled decode keeps between models: dynamo's code cache and inductor's CUDA-graph trees (whose
    private pool stays allocated until reset, and whose graphs may hold the tensors they were recorded with), then
    free the cache."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def model_rows(check: Check, rows: list[dict]) -> None:
    """One row per model shape and preset into ``rows``, kept when the deadline stops the part midway."""
    import hf_vram

    tokens = DRY_MODEL_TOKENS if check.dry else MODEL_TOKENS
    specs = DRY_MODEL_SHAPES if check.dry else MODEL_SHAPES
    for shape in check.model_shapes or list(specs):
        spec = specs[shape]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, spec["vocab_size"], (tokens["prefill"],), generator=g).to(check.device)
        reference = None
        for preset in ("float", *PRESETS):
            check.check_time()

            def load(preset=preset, spec=spec):
                model = random_model(check, spec)
                if preset != "float":
                    config = hf_vram.VramOptimizationConfig.from_preset(preset)
                    config.quantization.calibration = "none"  # no text data travels; calibration is tested on the CPU
                    if check.dry:
                        config.quantization.group_size = 32
                    hf_vram.optimize(model, config)
                return model

            row = {"model": shape, "config": ("fp32" if check.dry else "fp16") if preset == "float" else preset}
            try:
                measured, logits = _measure(check, load, preset, ids, tokens, reference)
                row.update(measured)
                reference = logits if reference is None else reference
            except Deadline:
                raise
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                traceback.print_exc()
            rows.append(row)
            check.save()
            print(json.dumps(row), flush=True)
            if not check.dry:
                torch.cuda.empty_cache()


def _measure(check: Check, load, preset: str, ids: torch.Tensor, tokens: dict, reference) -> tuple[dict, torch.Tensor]:
    import hf_vram
    from hf_vram.evaluation import decode_rate

    if check.dry:
        with hf_vram.track_peak_memory():
            model = load()
        weights = hf_vram.memory_report(model).total
        with hf_vram.track_peak_memory() as peak, torch.inference_mode():
            model(ids[None], logits_to_keep=1)
        prefill_peak = weights + peak.peak_bytes
    else:
        # Every figure is counted above what is held before the load (the reference logits, the ids): on the H200
        # the int8 row read 4539 MiB after the 2836 MiB fp16 row, so earlier rows left memory allocated, most likely
        # compiled decode's CUDA-graph pools (not confirmed: the next run's held_before_mib says).
        release_compiled()
        held_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model = load()
        load_peak = torch.cuda.max_memory_allocated() - held_before  # fp32 init, fp16 copy, quantization transients
        weights = torch.cuda.memory_allocated() - held_before  # what the loaded model holds
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(ids[None], logits_to_keep=1)
        prefill_peak = torch.cuda.max_memory_allocated() - held_before
    row = {"weights_mib": weights / 2**20, "prefill_peak_mib": prefill_peak / 2**20}
    if not check.dry:
        row.update(load_peak_mib=load_peak / 2**20, held_before_mib=held_before / 2**20)
    with torch.inference_mode():
        logits = model(ids[None, : tokens["window"]]).logits.float()
    row["logits_rel_err"] = 0.0 if reference is None else _rel(logits, reference)
    prompt = ids[None, : tokens["window"]]
    decode_rate(model, prompt, new_tokens=8)  # warm-up: the first row otherwise pays CUDA's and cuBLAS's lazy setup
    if not check.dry:
        torch.cuda.reset_peak_memory_stats()
    row["decode_tok_s"] = decode_rate(model, prompt, new_tokens=tokens["decode"])
    if not check.dry:
        row["decode_peak_mib"] = (torch.cuda.max_memory_allocated() - held_before) / 2**20
    if preset in PROFILED_PRESETS:
        row["eager_decode_profile"] = _decode_profile(model, prompt, check.dry)
    check.check_time()
    # The pooled KV cache does not compile (it refuses compile_config, by design); a dry run compiles one preset.
    if preset != "serving" and (not check.dry or preset == "int8"):
        decode_rate(model, prompt, new_tokens=tokens["decode"], compiled=True)
        row["compiled_decode_tok_s"] = decode_rate(model, prompt, new_tokens=tokens["decode"], compiled=True)
    del model
    return row, logits


# The H200 run read eager decode of the plain fp16 model at 12-15 tokens/s against 137-300 for every preset (int8
# keeps the same SDPA attention, norms and DynamicCache; only its linears differ): the next run says where the time goes.
PROFILED_PRESETS = ("float", "int8")
PROFILE_TOKENS = 16


def _decode_profile(model, prompt: torch.Tensor, dry: bool, top: int = 8) -> dict:
    """Where one eager ``generate`` of ``PROFILE_TOKENS`` tokens spends its time: the ops with the most self time on
    the host and on the device (ms, calls), and the generate call's own wall time."""
    from torch.profiler import ProfilerActivity, profile

    from hf_vram.evaluation import decode_rate

    activities = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        decode_rate(model, prompt, new_tokens=PROFILE_TOKENS)
    wall_ms = 1e3 * (time.perf_counter() - start)
    events = prof.key_averages()

    def ranked(attr: str) -> list[list]:
        chosen = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:top]
        return [[e.key[:80], round(getattr(e, attr, 0.0) / 1e3, 3), e.count] for e in chosen if getattr(e, attr, 0.0) > 0]

    return {"tokens": PROFILE_TOKENS, "wall_ms": round(wall_ms, 1), "host": ranked("self_cpu_time_total"),
            "device": ranked("self_device_time_total")}  # fmt: skip


# -- part 4: continuous batching over quantized pages -----------------------------------------------------------------
BATCH = {"requests": 16, "prompt": 256, "new": 32}
DRY_BATCH = {"requests": 3, "prompt": 40, "new": 4}


def batching_rows(check: Check, rows: list[dict]) -> None:
    """Transformers' continuous batching on the GPU with SmolLM2's shapes (random weights, hf_vram int8 weights):
    K/V in the model's dtype (Transformers' own path), and hf_vram's int8 and int4 pages, whose decodes the Triton
    kernel (``triton_paged_rows``) attends from the pages, against the same pages read by torch ops (the path CUDA
    took before): tokens/s of each, and the kernel's greedy tokens equal to the torch path's. A dry run forces the
    kernel on the CPU, under the interpreter."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import hf_vram
    from hf_vram.kvcache import paged_decodes

    sizes = DRY_BATCH if check.dry else BATCH
    spec = (DRY_MODEL_SHAPES if check.dry else MODEL_SHAPES)["tiny" if check.dry else "smollm2"]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, spec["vocab_size"], (sizes["prompt"],), generator=g).tolist() for _ in range(sizes["requests"])]
    gen = GenerationConfig(max_new_tokens=sizes["new"], do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=64, max_batch_tokens=1024)
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    per_token = spec["num_hidden_layers"] * 2 * spec["num_key_value_heads"] * head_dim * 2  # K/V bytes in 16 bits
    budget = 2 * sizes["requests"] * (sizes["prompt"] + sizes["new"]) * per_token  # every request fits, twice over
    chosen = paged_decodes.decode_kernel
    for kv in ("auto", "int8", "int4"):
        check.check_time()
        row = {"kv": "model dtype" if kv == "auto" else kv}
        try:
            model = random_model(check, spec)
            config = hf_vram.VramOptimizationConfig(
                quantization={"scheme": "int8", "calibration": "none"},
                kv_cache={"dtype": kv, "enabled": False, "max_memory": budget},
            )
            hf_vram.optimize(model, config)
            kernel_paths = {"torch": lambda device: None} if kv == "auto" else {
                "kernel": (lambda device: "triton") if check.dry else chosen, "torch": lambda device: None,
            }  # fmt: skip
            tokens = {}
            for path, pick in kernel_paths.items():
                paged_decodes.decode_kernel = pick
                model.generate_batch(prompts[:1], generation_config=gen, continuous_batching_config=cb)  # warm-up
                check.sync()
                start = time.perf_counter()
                out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
                check.sync()
                row[f"{path}_tok_s"] = sizes["requests"] * sizes["new"] / (time.perf_counter() - start)
                tokens[path] = [o.generated_tokens for o in out.values()]
            if "kernel" in tokens:
                row["tokens_equal"] = sum(
                    next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                    for x, y in zip(tokens["kernel"], tokens["torch"], strict=True)
                )
                row["tokens"] = sizes["requests"] * sizes["new"]
            del model
        except Deadline:
            raise
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        finally:
            paged_decodes.decode_kernel = chosen
        rows.append(row)
        check.save()
        print(json.dumps(row), flush=True)


# -- driver ---------------------------------------------------------------------------------------------------------
def keep_earlier_parts(out: Path | None, result: dict, rerun: list[str]) -> dict:
    """``result`` (this run's header) with the parts not rerun taken from ``out``'s earlier run on the same card, so
    a short second device call can finish the parts a first one's deadline cut, without redoing the rest."""
    if out is None or not out.exists():
        raise SystemExit(f"--parts {','.join(rerun)}: no earlier results at {out} to keep the other parts from")
    earlier = json.loads(out.read_text())
    if earlier.get("device", {}).get("card") != result["device"].get("card"):
        raise SystemExit(
            f"--parts: the earlier results are from {earlier.get('device', {}).get('card')!r}, this card is "
            f"{result['device'].get('card')!r}; rerun every part (drop --parts)"
        )
    kept = {name: rows for name, rows in earlier.get("parts", {}).items() if name not in rerun}
    runs = {name: earlier.get("part_runs", {}).get(name, earlier.get("date")) for name in kept}
    return {**result, "parts": kept, "part_runs": runs}


def device_info(dry: bool) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers_from": transformers.__file__}
    if dry:
        info["card"] = "none (dry run on the CPU, TRITON_INTERPRET=1)"
        return info
    info["card"] = torch.cuda.get_device_name(0)
    info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        import subprocess

        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        info["driver"] = "unknown"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU under TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/gpu.json; dry runs: a temp file)")
    parser.add_argument("--deadline", type=float, default=420.0, help="stop starting new parts after this many seconds")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated parts to run (kernels, batching, models); the others are kept from --out's earlier run",
    )
    parser.add_argument("--model-shapes", default="", help="the models part's shapes, in order (default: all)")
    args = parser.parse_args()
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}; got {args.parts!r}")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--dry-run needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run on the CPU")
    out = Path(args.out) if args.out else (None if args.dry_run else RESULTS_ROOT / "gpu.json")
    model_shapes = [name.strip() for name in args.model_shapes.split(",") if name.strip()]
    known = DRY_MODEL_SHAPES if args.dry_run else MODEL_SHAPES
    if set(model_shapes) - set(known):
        parser.error(f"--model-shapes takes a comma-separated subset of {', '.join(known)}; got {args.model_shapes!r}")
    check = Check(args.dry_run, args.deadline, out, model_shapes)
    check.result.update(device=device_info(args.dry_run), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M"))
    if set(parts) != set(PARTS):
        check.result = keep_earlier_parts(out, check.result, parts)
    torch.set_num_threads(2)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    dtypes = (torch.float16,) if args.dry_run else (torch.float16, torch.bfloat16)
    runs = {
        "kernels": lambda rows: kernel_cases(check, shapes, dtypes, rows),
        "batching": lambda rows: batching_rows(check, rows),
        "models": lambda rows: model_rows(check, rows),
    }
    check.result.pop("stopped", None)
    for name in (part for part in PARTS if part in parts):
        check.result["parts"][name] = []  # filled row by row, so a part the deadline stops keeps what it measured
        check.result.setdefault("part_runs", {})[name] = check.result["date"]
        try:
            runs[name](check.result["parts"][name])
        except Deadline:
            check.result["stopped"] = f"deadline of {args.deadline:.0f} s reached during {name}"
            break
        finally:
            check.save()
    print("\n".join(tables(check.result)))
    failed = [r for r in check.result["parts"].get("kernels", []) if not r.get("pass", True) and not r.get("peer")]
    failed += [r for r in check.result["parts"].get("models", []) if "error" in r]
    failed += [
        r for r in check.result["parts"].get("batching", []) if "error" in r or r.get("tokens_equal", 0) < r.get("tokens", 0)
    ]
    return 1 if failed else 0


def tables(result: dict) -> list[str]:
    info = result["device"]
    lines = [
        "## GPU check (`benchmarks/gpu_check.py`)" + (" - DRY RUN on the CPU" if result.get("dry_run") else ""),
        "",
        f"Run {result.get('date')} on {info.get('card')}"
        + (f", driver {info['driver']}" if info.get("driver") else "")
        + f"; torch {info.get('torch')}; {result.get('elapsed_s', 0):.0f} s"
        + (f"; {result['stopped']}" if result.get("stopped") else "")
        + ".",
        "",
    ]
    versions = result.get("versions", {})
    peers = ", ".join(f"{name} {versions[name]}" for name in ("transformers", "bitsandbytes", "torchao") if name in versions)
    if peers:
        lines += [f"Packages: {peers}.", ""]
    runs = result.get("part_runs", {})
    if len(set(runs.values())) > 1:  # a later call reran some parts on the same card
        lines += ["Parts run at: " + ", ".join(f"{name} {date}" for name, date in runs.items()) + ".", ""]
    lines += [
        "| kernel | shapes | shape | dtype | max rel. error | pass | ms | baseline | baseline ms | x baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["parts"].get("kernels", []):
        if "error" in r:
            lines.append(
                f"| {r['kernel']} | {r['shapes']} | {r['shape']} | {r.get('dtype', '')} | failed: {r['error'][:120]} | no | | | | |"
            )
            continue
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        ok = "-" if r.get("peer") else ("yes" if r.get("pass") else "NO")
        ratio = f"{r['baseline_ms'] / r['ms']:.2f}x" if r.get("ms") and r.get("baseline_ms") == r.get("baseline_ms") else ""
        lines.append(
            f"| {r['kernel']} | {r['shapes']} | {r['shape']} | {r['dtype']} | {err} | {ok} | {r.get('ms', 0):.3f} | "
            f"{r['baseline']} | {r['baseline_ms']:.3f} | {ratio} |"
        )
    models = result["parts"].get("models", [])
    if models:
        lines += [
            "",
            "Random weights at real shapes (seeded; the same weights for every preset). logits error: relative to the "
            "unquantized model's logits (fp16 on the GPU) over the compared window.",
            "",
        ]
        if not result.get("dry_run") and any("held_before_mib" not in r for r in models if "error" not in r):
            lines += [
                "This run predates the reset between rows: each row's memory columns after the first also count what "
                "the rows before it left allocated (most likely compiled decode's CUDA-graph pools), so only the "
                "first row's memory and every row's error and tokens/s are the preset's own.",
                "",
            ]
        lines += [
            "| model | config | weights MiB | load peak MiB | prefill peak MiB | decode peak MiB | logits rel. error | "
            "decode tok/s | compiled tok/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            if "error" in r:
                lines.append(f"| {r.get('model', '')} | {r['config']} | failed: {r['error'][:120]} | | | | | | |")
                continue
            lines.append(
                f"| {r.get('model', '')} | {r['config']} | {r['weights_mib']:.1f} | "
                f"{r.get('load_peak_mib', float('nan')):.1f} | {r['prefill_peak_mib']:.1f} | "
                f"{r.get('decode_peak_mib', float('nan')):.1f} | {r.get('logits_rel_err', float('nan')):.2e} | "
                f"{r['decode_tok_s']:.1f} | "
                f"{r.get('compiled_decode_tok_s', float('nan')):.1f} |"
            )
    batching = result["parts"].get("batching", [])
    if batching:
        lines += [
            "",
            "Continuous batching (`generate_batch`), SmolLM2's shapes with random weights and hf_vram int8 weights, "
            "requests submitted at once: K/V in the model's dtype (Transformers' path) and hf_vram's quantized pages, "
            "decodes attended by the Triton kernel from the pages, or the pages read by torch ops. Tokens equal: the "
            "kernel's greedy tokens equal to the torch path's before the first difference.",
            "",
            "| K/V | kernel tok/s | torch-read tok/s | x torch | tokens equal |",
            "|---|---|---|---|---|",
        ]
        for r in batching:
            if "error" in r:
                lines.append(f"| {r['kv']} | failed: {r['error'][:120]} | | | |")
                continue
            kernel, torch_rate = r.get("kernel_tok_s"), r["torch_tok_s"]
            speed = f"{kernel:.1f} | {torch_rate:.1f} | {kernel / torch_rate:.2f}x" if kernel else f"- | {torch_rate:.1f} | -"
            equal = f"{r['tokens_equal']} of {r['tokens']}" if "tokens" in r else "-"
            lines.append(f"| {r['kv']} | {speed} | {equal} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
