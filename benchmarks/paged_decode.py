"""Decode attention over int8 K/V pages: hf_vram's CPU kernel against torch's path, one layer of one step.

What continuous batching does per layer for its one-token sequences over int8 pages. Torch's path (what hf_vram ran
before the kernel, and still runs where it cannot be built): gather the rows the step reads
(``index_select``), dequantize them to the model dtype (``KVCodec.decode``), then ``varlen_attention``, whose
decodes share padded ``scaled_dot_product_attention`` calls. The kernel (``hf_vram.kernels.paged_decode``) reads the
rows by index and attends from the int8 codes. Both in bfloat16 activations; the error is against a float32
attention over the dequantized rows. Rows are SmolLM2-135M's attention (9 query heads on 3 KV heads of 64) at the
batching benchmark's mix (128-640 keys) and at long contexts, and an 8B Llama-3-class layer (32 on 8 heads of 128).
Keys sit in whole 64-token pages in shuffled order, as the pool hands them out. Median of 30 calls after a warm-up,
2 threads, on this machine's torch CPU path (the kernel built for it).

Usage: ``python benchmarks/paged_decode.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import results_path, write_result  # noqa: E402

RESULTS = results_path("paged_decode")
PAGE = 64
CASES = [  # name, kv heads, query heads per kv head, head dim, keys per sequence
    ("SmolLM2, 4 decodes of 128-640 keys", 3, 3, 64, [128, 300, 470, 640]),
    ("SmolLM2, 8 decodes of 128-640 keys", 3, 3, 64, [128 + 73 * i for i in range(8)]),
    ("SmolLM2, 16 decodes of 128-640 keys", 3, 3, 64, [128 + 34 * i for i in range(16)]),
    ("SmolLM2, 1 decode of 8192 keys", 3, 3, 64, [8192]),
    ("SmolLM2, 8 decodes of 2048 keys", 3, 3, 64, [2048] * 8),
    ("8B Llama-3 layer, 8 decodes of 512-2048 keys", 8, 4, 128, [512 + 216 * i for i in range(8)]),
]


def _median_us(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def measure(name: str, kv_heads: int, group: int, dim: int, lengths: list[int]) -> dict:
    from hf_vram.kernels.paged_decode import paged_decode_int8, paged_decode_int8_reference
    from hf_vram.kernels.varlen_attention import varlen_attention
    from hf_vram.kvcache.codec import KVCodec

    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    pages = -(-total // PAGE) + 8
    codec = KVCodec(8, kv_heads, dim)
    key_rows, value_rows = (codec.encode(torch.randn(pages * PAGE, kv_heads, dim, generator=g)) for _ in range(2))
    order = torch.randperm(pages, generator=g)
    read_index = (order[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)[:total]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    n = len(lengths)
    heads = kv_heads * group
    query = torch.randn(1, heads, n, dim, generator=g).bfloat16()
    fresh = [torch.randn(n, kv_heads, dim, generator=g).bfloat16() for _ in range(2)]
    cu_q = torch.arange(n + 1, dtype=torch.int32)
    cu_k = torch.tensor([0, *lengths]).cumsum(0).int()
    scale = dim**-0.5
    grouped = query[0].transpose(0, 1).reshape(n, kv_heads, group, dim)
    last = cu_k[1:].long() - 1

    def torch_path() -> torch.Tensor:
        read = []
        for rows, f in zip((key_rows, value_rows), fresh, strict=True):
            x = codec.decode(rows.index_select(0, read_index), torch.bfloat16)
            x[last] = f  # each decode's own token as computed
            read.append(x.transpose(0, 1)[None])
        return varlen_attention(query, read[0], read[1], cu_q, cu_k, scale)

    def kernel() -> torch.Tensor:
        args = (key_rows, value_rows, read_index, starts, torch.tensor(lengths), *fresh)
        return paged_decode_int8(grouped, *args, scale)

    args = (key_rows, value_rows, read_index, starts, torch.tensor(lengths), *(f.float() for f in fresh))
    want = paged_decode_int8_reference(grouped.float(), *args, scale)
    got_torch = torch_path()[0].transpose(0, 1).reshape(n, kv_heads, group, dim).float()
    got_kernel = kernel()
    torch_us, kernel_us = _median_us(torch_path), _median_us(kernel)
    return {
        "name": name,
        "keys": total,
        "torch_us": torch_us,
        "kernel_us": kernel_us,
        "speedup": torch_us / kernel_us,
        "torch_err": (got_torch - want).abs().max().item(),
        "kernel_err": (got_kernel - want).abs().max().item(),
    }


def tables(result: dict) -> list[str]:
    lines = [
        "### Decode attention over int8 K/V pages (`benchmarks/paged_decode.py`)",
        "",
        f"Run {result['date']} on {result['machine']}; hf_vram's kernel built for `{result['isa']}`. One layer of one "
        "continuous-batching step: the decodes' attention from int8 page rows (keys in shuffled 64-token pages), "
        "torch's path (gather, dequantize to bfloat16, shared padded SDPA calls) against hf_vram's CPU kernel "
        "(attends from the int8 codes by index), bfloat16 activations; max abs error against float32 attention "
        "over the same dequantized rows. Median of 30 calls, microseconds."
        + (f" {result['note']}." if result.get("note") else ""),
        "",
        "| case | keys | torch path us | hf_vram kernel us | x faster | torch path err | kernel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['keys']} | {r['torch_us']:.0f} | {r['kernel_us']:.0f} | {r['speedup']:.2f}x | "
            f"{r['torch_err']:.1e} | {r['kernel_err']:.1e} |"
        )
    return lines + [""]


def main() -> None:
    from hf_vram.kernels import cpu_extension

    torch.set_num_threads(2)
    if not cpu_extension.load():
        raise SystemExit("hf_vram's CPU kernel could not be built here (see the warning): nothing to compare.")
    rows = [measure(*case) for case in CASES]
    for r in rows:
        print(f"{r['name']}: torch {r['torch_us']:.0f} us, kernel {r['kernel_us']:.0f} us ({r['speedup']:.2f}x)")
    write_result(RESULTS, {"date": time.strftime("%Y-%m-%d %H:%M"), "isa": cpu_extension.target_isa(), "rows": rows})


if __name__ == "__main__":
    main()
