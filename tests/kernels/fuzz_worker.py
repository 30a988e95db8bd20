"""Calls every kernel entry with misaligned, strided and ragged inputs, one case at a time (run in a subprocess).

Each case must give the reference's result; a raw kernel wrapper (``cpu.*``) may instead refuse an input its kernel
cannot take with hf_vram's ``ValueError`` (dispatch and layers must then take another path, never refuse).
Protocol, one line per event on stdout: ``BEGIN i name`` before case ``i`` runs, then ``PASS i`` or ``FAIL i why``.
A case that kills the process (SIGSEGV, SIGILL) leaves a ``BEGIN`` without an answer; the parent
(``test_kernel_fuzz.py``) records it as a crash with its name and restarts the worker after it
(``--start i+1``). Each result is compared with the plain-torch reference in float64.

    python -m tests.kernels.fuzz_worker {cpu|triton|selftest} [--start N] [--list]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import sys
from collections.abc import Callable

import torch

from hf_vram.kernels import cpu, dispatch
from hf_vram.kernels.reference import int4_matmul_reference, int8_matmul_reference, w8a8_matmul_reference
from hf_vram.quant import schemes

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# How an input is placed in memory: aligned, at an 8- or 40-byte offset (what a memory-mapped safetensors file
# gives), every other column of a wider tensor (strided), or a transposed copy seen through .t() (column-major).
PLACEMENTS = ("aligned", "offset8", "offset40", "strided", "transposed")
PAIRS = [
    ("aligned", "aligned"),
    ("offset8", "offset8"),
    ("offset40", "aligned"),
    ("aligned", "offset40"),
    ("strided", "strided"),
    ("transposed", "offset8"),
]


def place(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t``, laid out in memory as ``how`` says."""
    if how == "aligned":
        return t.clone()
    if how.startswith("offset"):
        offset = int(how[6:])
        nbytes = t.numel() * t.element_size()
        buf = torch.zeros(nbytes + offset + 128, dtype=torch.uint8)
        base = (64 - buf.data_ptr() % 64) % 64
        out = buf[base + offset : base + offset + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        assert out.data_ptr() % 64 == offset
        return out
    if how == "strided":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed":
        return t.t().contiguous().t() if t.dim() == 2 else t.clone()
    raise ValueError(how)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if tuple(out.shape) != tuple(shape):
        raise AssertionError(f"shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != ref.dtype:
        raise AssertionError(f"dtype {out.dtype}, expected {ref.dtype}")
    err = _rel_err(out, ref)
    if not err <= TOLERANCE[dtype]:
        raise AssertionError(f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")


def _data(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)


# -- CPU entries -------------------------------------------------------------------------------------------------
INT8_SHAPES = [(1, 64, 64), (3, 48, 96), (17, 80, 130), (5, 49, 33)]
INT4_SHAPES = [(1, 64, 128, 64), (5, 48, 256, 128), (17, 32, 96, 32)]
ROWS = [1, 16, 17, 64, 600]


def cpu_cases() -> list[tuple[str, Callable[[], None]]]:
    cases = []
    for (m, n, k), (xd, act), (px, pw) in itertools.product(
        INT8_SHAPES, [("f32", "bf16"), ("bf16", "bf16"), ("f16", "f16"), ("f32", "f32"), ("bf16", "f16")], PAIRS
    ):
        cases.append(
            (
                f"cpu.int8_packed_matmul m{m} n{n} k{k} x:{xd} act:{act} x@{px} w@{pw}",
                _int8_packed(m, n, k, DTYPES[xd], DTYPES[act], px, pw),
            )
        )
    for (m, n, k, g), (xd, act), (px, pw) in itertools.product(
        INT4_SHAPES, [("f32", "bf16"), ("bf16", "bf16"), ("f16", "f16"), ("f32", "f32")], PAIRS
    ):
        cases.append(
            (
                f"cpu.int4_packed_matmul m{m} n{n} k{k} g{g} x:{xd} act:{act} x@{px} w@{pw}",
                _int4_packed(m, n, k, g, DTYPES[xd], DTYPES[act], px, pw),
            )
        )
    for (m, n, k), xd, (px, pw) in itertools.product(INT8_SHAPES, ("f32", "bf16"), PAIRS):
        cases.append((f"cpu.w8a8 m{m} n{n} k{k} x:{xd} x@{px} w@{pw}", _w8a8(m, n, k, DTYPES[xd], px, pw)))
    for m, xd, (px, pw), bias in itertools.product(ROWS, ("f32", "bf16", "f16"), PAIRS[:4], (False, True)):
        cases.append((f"dispatch.int8_linear m{m} x:{xd} x@{px} w@{pw} bias:{bias}", _int8_dispatch(m, DTYPES[xd], px, pw, bias)))
        cases.append((f"dispatch.int4_linear m{m} x:{xd} x@{px} w@{pw} bias:{bias}", _int4_dispatch(m, DTYPES[xd], px, pw, bias)))
    for scheme, in_features, xd, how in itertools.product(
        ("int8", "int4", "w8a8"), (64, 100), ("f32", "bf16", "f16"), ("offset8", "offset40", "strided")
    ):
        cases.append((f"layer {scheme} in{in_features} x:{xd} buffers@{how}", _layer(scheme, in_features, DTYPES[xd], how)))
    for xd, how in itertools.product(("f32", "bf16"), ("offset8", "offset40")):
        cases.append((f"layer tied int8 head x:{xd} rows@{how}", _tied_head(DTYPES[xd], how)))
    return cases


def _int8_packed(m, n, k, x_dtype, act, px, pw):
    def run():
        x, w, _ = _data(m, n, k, m * n + k)
        q, s = schemes.quantize_int8(w)
        x = x.to(x_dtype)
        out = cpu.int8_packed_matmul(place(x, px), place(q, pw), place(s, "offset8"), act)
        ref = int8_matmul_reference(x.to(act).double(), q, s).to(x_dtype)
        _check(out, ref, act if act != torch.float32 else x_dtype, (m, n))

    return run


def _int4_packed(m, n, k, g, x_dtype, act, px, pw):
    def run():
        x, w, _ = _data(m, n, k, m + n * k)
        packed, sz = schemes.quantize_int4(w, g)
        codes = schemes.unpack_int4(packed)
        x = x.to(x_dtype)
        out = cpu.int4_packed_matmul(place(x, px), place(cpu.int4_to_cpu_layout(codes), pw), place(sz, pw), g, act)
        ref = int4_matmul_reference(x.to(act).double(), codes, sz, g).to(x_dtype)
        _check(out, ref, act if act != torch.float32 else x_dtype, (m, n))

    return run


def _w8a8(m, n, k, x_dtype, px, pw):
    def run():
        x, w, _ = _data(m, n, k, 3 * m + n)
        q, s = schemes.quantize_int8(w)
        x = x.to(x_dtype)
        out = cpu.w8a8_matmul(place(x, px), cpu.w8a8_pack(place(q, pw), place(s, pw)))
        ref = w8a8_matmul_reference(x.double(), q, s).to(x_dtype)
        # FBGEMM's 7-bit activation codes on AVX2 (kernels/cpu.py): compared at bf16 tolerance.
        _check(out, ref, torch.bfloat16, (m, n))

    return run


def _int8_dispatch(m, x_dtype, px, pw, bias):
    def run():
        x, w, b = _data(m, 96, 160, m)
        q, s = schemes.quantize_int8(w)
        x = x.to(x_dtype)
        bb = b.to(x_dtype) if bias else None
        out = dispatch.int8_linear(place(x, px), place(q, pw), s, bb)
        ref = (int8_matmul_reference(x.double(), q, s) + (bb.double() if bias else 0)).to(x_dtype)
        _check(out, ref, torch.bfloat16 if x_dtype == torch.float32 else x_dtype, (m, 96))

    return run


def _int4_dispatch(m, x_dtype, px, pw, bias):
    def run():
        x, w, b = _data(m, 96, 256, m + 1)
        packed, sz = schemes.quantize_int4(w, 64)
        codes = schemes.unpack_int4(packed)
        x = x.to(x_dtype)
        bb = b.to(x_dtype) if bias else None
        out = dispatch.int4_linear(place(x, px), place(cpu.int4_to_cpu_layout(codes), pw), cpu.CPU_INT4_LAYOUT, sz, 64, bb)
        ref = (int4_matmul_reference(x.double(), codes, sz, 64) + (bb.double() if bias else 0)).to(x_dtype)
        _check(out, ref, torch.bfloat16 if x_dtype == torch.float32 else x_dtype, (m, 96))

    return run


def _layer(scheme: str, in_features: int, x_dtype, how: str):
    """A layer whose buffers arrive misaligned or strided, as a memory-mapped checkpoint hands them over."""

    def run():
        from hf_vram.quant.linear import SCHEME_LAYERS

        x, w, b = _data(7, 48, in_features, in_features)
        kwargs = {"group_size": 32} if scheme == "int4" else {}
        layer = SCHEME_LAYERS[scheme](in_features, 48, True, **kwargs)
        tensors = layer.quantize_weight(w)
        layer.load_quantized({k: place(v, how) if v.dim() else v for k, v in tensors.items()})
        layer.bias.data.copy_(b)
        x = x.to(x_dtype)
        out = layer(place(x, how))
        ref = (x.double() @ layer.dequantize_weight(torch.float64).t() + b.double()).to(x_dtype)
        tol = torch.bfloat16 if scheme == "w8a8" or x_dtype == torch.float32 else x_dtype
        _check(out, ref, tol, (7, 48))

    return run


def _tied_head(x_dtype, how: str):
    def run():
        from hf_vram.quant.embedding import Int8Embedding, TiedInt8Head

        emb = Int8Embedding(80, 64)
        tensors = emb.quantize_weight(torch.randn(80, 64))
        emb.load_quantized({k: place(v, how) for k, v in tensors.items()})
        head = TiedInt8Head(emb)
        x = torch.randn(3, 64).to(x_dtype)
        ref = (x.double() @ emb.dequantize_weight(torch.float64).t()).to(x_dtype)
        _check(head(x), ref, torch.bfloat16, (3, 80))

    return run


# -- Triton entries (under TRITON_INTERPRET=1 on the CPU) ---------------------------------------------------------
def triton_cases() -> list[tuple[str, Callable[[], None]]]:
    cases = []
    for (m, n, k), xd, (px, pw) in itertools.product([(1, 32, 48), (17, 40, 70)], ("f32", "f16"), PAIRS[::2]):
        cases.append((f"triton int8 m{m} n{n} k{k} x:{xd} x@{px} w@{pw}", _triton_int8(m, n, k, DTYPES[xd], px, pw)))
        cases.append((f"triton w8a8 m{m} n{n} k{k} x:{xd} x@{px} w@{pw}", _triton_w8a8(m, n, k, DTYPES[xd], px, pw)))
    for (m, n, k, g), (px, pw) in itertools.product([(1, 32, 64, 32), (5, 24, 128, 64)], PAIRS[::2]):
        cases.append((f"triton int4 m{m} n{n} k{k} g{g} x@{px} w@{pw}", _triton_int4(m, n, k, g, px, pw)))
    for how in ("aligned", "transposed-heads", "offset8"):
        cases.append((f"triton flash attention q@{how}", _triton_flash(how)))
        cases.append((f"triton add+rmsnorm x@{how}", _triton_norm(how)))
    cases.append(("triton paged decode, strided pool refused", _triton_paged_strided))
    return cases


def _triton_int8(m, n, k, x_dtype, px, pw):
    def run():
        from hf_vram.kernels.triton_matmul import int8_matmul_triton

        x, w, b = _data(m, n, k, 5)
        q, s = schemes.quantize_int8(w)
        x = x.to(x_dtype)
        out = int8_matmul_triton(place(x, px), place(q, pw), place(s, pw), place(b.to(x_dtype), pw))
        _check(out, (int8_matmul_reference(x.double(), q, s) + b.double()).to(x_dtype), x_dtype, (m, n))

    return run


def _triton_w8a8(m, n, k, x_dtype, px, pw):
    def run():
        from hf_vram.kernels.triton_matmul import w8a8_matmul_triton

        x, w, _ = _data(m, n, k, 6)
        q, s = schemes.quantize_int8(w)
        x = x.to(x_dtype)
        out = w8a8_matmul_triton(place(x, px), place(q, pw), place(s, pw))
        _check(out, w8a8_matmul_reference(x.double(), q, s).to(x_dtype), x_dtype, (m, n))

    return run


def _triton_int4(m, n, k, g, px, pw):
    def run():
        from hf_vram.kernels.triton_matmul import int4_matmul_triton

        x, w, _ = _data(m, n, k, 7)
        packed, sz = schemes.quantize_int4(w, g)
        out = int4_matmul_triton(place(x, px), place(packed, pw), place(sz, pw), g)
        _check(out, int4_matmul_reference(x.double(), schemes.unpack_int4(packed), sz, g).float(), torch.float32, (m, n))

    return run


def _heads(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "transposed-heads":  # [B, T, H, D] seen as [B, H, T, D], as attention modules hand it over
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return place(t, how)


def _triton_flash(how: str):
    def run():
        from hf_vram.kernels.triton_flash import flash_attention_triton, flash_reference

        g = torch.Generator().manual_seed(8)
        q, k, v = (torch.randn(2, h, 9, 16, generator=g) for h in (4, 2, 2))
        out = flash_attention_triton(_heads(q, how), _heads(k, how), _heads(v, how), 0.25, True)
        _check(out, flash_reference(q, k, v, 0.25, True).float(), torch.float32, q.shape)

    return run


def _triton_norm(how: str):
    def run():
        from hf_vram.kernels.triton_norm import add_rms_norm_reference, add_rms_norm_triton

        g = torch.Generator().manual_seed(9)
        x, r = torch.randn(2, 5, 72, generator=g), torch.randn(2, 5, 72, generator=g)
        w = torch.randn(72, generator=g)
        total, out = add_rms_norm_triton(_heads(x, how), _heads(r, how), place(w, "offset8"), 1e-6)
        ref_total, ref = add_rms_norm_reference(x, r, w, 1e-6)
        _check(total, ref_total, torch.float32, x.shape)
        _check(out, ref, torch.float32, x.shape)

    return run


def _triton_paged_strided() -> None:
    from hf_vram.kernels.triton_paged import paged_decode_triton

    keys = torch.randn(32, 2, 16).transpose(0, 1)  # a view of the pool, not its storage
    try:
        paged_decode_triton(torch.randn(1, 4, 16), keys, keys, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3]), 16, 0.25)
    except ValueError as err:
        if "not contiguous" not in str(err):
            raise
        return
    raise AssertionError("a strided pool reached the kernel")


# -- self test: the harness must turn a crash into a named failure ------------------------------------------------
def selftest_cases() -> list[tuple[str, Callable[[], None]]]:
    def crash() -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV

    def ok() -> None:
        torch.ones(1)

    return [("before", ok), ("segfault on purpose", crash), ("after", ok)]


SUITES = {"cpu": cpu_cases, "triton": triton_cases, "selftest": selftest_cases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = SUITES[args.suite]()
    if args.list:
        print(len(cases))
        return
    for i, (name, run) in enumerate(cases):
        if i < args.start:
            continue
        print(f"BEGIN {i} {name}", flush=True)
        try:
            run()
        except ValueError as err:
            refused = name.startswith("cpu.") and str(err).startswith("hf_vram kernel")
            print(f"PASS {i} refused" if refused else f"FAIL {i} ValueError: {str(err)[:300]}", flush=True)
        except Exception as err:  # every failure is reported with its case; the next case still runs
            print(f"FAIL {i} {type(err).__name__}: {str(err)[:300]}".replace("\n", " "), flush=True)
        else:
            print(f"PASS {i}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
