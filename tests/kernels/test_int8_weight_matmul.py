"""hf_vram's int8 weight-only matmul (``csrc/int8_matmul.cpp``) against float64, on every build this machine can run
(its BF16-dot loops on an AVX-512 build where the CPU has AVX512-BF16, its float32 loops elsewhere), and the
dispatch that takes it."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels import cpu_extension, dispatch, int8_weight_matmul
from hf_vram.kernels.cpu_caps import cpu_flags, reachable_capabilities, torch_capability
from hf_vram.kernels.int8_weight_matmul import int8_weight_matmul as matmul
from hf_vram.kernels.int8_weight_matmul import int8_weight_matmul_reference as reference
from tests.kernels.cpu_paths import assert_passes_on_path

pytestmark = pytest.mark.skipif(not cpu_extension.compiler_present(), reason="no C++ compiler: torch's kernel runs")


def _case(m: int, n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x, q, (torch.rand(n, generator=g) / 50 + 1e-3).to(dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within one rounding of the output dtype (plus float32 accumulation), relative to the row's scale."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 1e-6}[got.dtype]
    err = (got.double() - want.double()).abs()
    assert (err <= 2 * eps * want.double().abs() + 1e-4 * want.double().abs().amax(-1, keepdim=True)).all(), err.max()


# rows: one, a tile's edges (kDotM 6, kTileM 4), the dispatch's limit; channels: a tile's edges (4); inputs: whole
# BF16-dot steps (32), SmolLM2's 576, and sizes that are not (float32 loops and their tails)
SHAPES = [(1, 1, 32), (5, 4, 576), (6, 5, 64), (7, 3, 96), (13, 100, 576), (128, 37, 160), (3, 9, 40), (9, 6, 17)]


@pytest.mark.parametrize("m, n, k", SHAPES, ids=[f"m{m} n{n} k{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def test_kernel_equals_float64(m, n, k, dtype):
    x, q, s = _case(m, n, k, dtype)
    _assert_close(matmul(x, q, s), reference(x, q, s))


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Bitwise: what continuous batching needs (a request's tokens must not change with the step it lands in)."""
    x, q, s = _case(40, 70, 576)
    whole = matmul(x, q, s)
    for rows in (slice(0, 1), slice(3, 4), slice(5, 17), slice(33, 40)):
        assert torch.equal(matmul(x[rows], q, s), whole[rows])


def test_bad_operands_are_refused_naming_what_is_wrong():
    x, q, s = _case(4, 8, 64)
    with pytest.raises(RuntimeError, match="weight must be contiguous int8"):
        matmul(x, q.to(torch.int16), s)
    with pytest.raises(RuntimeError, match="with x's K"):
        matmul(x[:, :32], q, s)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous \[N\]"):
        torch.ops.hf_vram_cpu.int8_weight_matmul(x, q, s[:4])
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        torch.ops.hf_vram_cpu.int8_weight_matmul(x.double(), q, s.double())


def test_the_bf16_dot_loops_run_exactly_where_the_cpu_has_them():
    expected = torch_capability() == "avx512" and "avx512_bf16" in cpu_flags()
    assert int8_weight_matmul.bf16_dot_available() == expected


def test_the_dispatch_takes_the_kernel_on_the_paths_where_it_was_measured_to_win():
    """BF16-dot loops: up to MAX_ROWS; the AVX2 path's float32 loops: up to FLOAT_LOOPS_MAX_ROWS;
    anywhere else torch's packed kernel."""
    expected = {"avx2": int8_weight_matmul.FLOAT_LOOPS_MAX_ROWS}.get(torch_capability(), 0)
    if int8_weight_matmul.bf16_dot_available():
        expected = int8_weight_matmul.MAX_ROWS
    assert int8_weight_matmul.max_rows() == expected


@pytest.mark.parametrize("rows", [1, 16, 32, 33, 128, 129])
def test_dispatch_takes_the_kernel_for_bfloat16_decode_rows_where_it_runs(rows, monkeypatch):
    x, q, s = _case(rows, 48, 576)
    calls = []
    monkeypatch.setattr(int8_weight_matmul, "int8_weight_matmul", lambda *a: calls.append(1) or matmul(*a))
    out = dispatch.int8_linear(x, q, s.float(), None)
    assert bool(calls) == (rows <= int8_weight_matmul.max_rows())
    _assert_close(out, reference(x, q, s))


def test_float32_prefill_rows_keep_their_float32_matmul(monkeypatch):
    """Past the packed kernel's rows, float32 activations dequantize into a float32 matmul: never rounded to
    bfloat16 for this kernel."""
    x, q, s = _case(dispatch.cpu_thresholds().packed_max_rows + 1, 48, 576, torch.float32)
    monkeypatch.setattr(int8_weight_matmul, "int8_weight_matmul", lambda *a: pytest.fail("took the bf16 kernel"))
    out = dispatch.int8_linear(x, q, s, None)
    assert (out.double() - reference(x.double(), q, s.double())).abs().max() < 1e-4


@pytest.mark.parametrize("capability", [c for c in ("avx2", "default") if c in reachable_capabilities()])
def test_each_build_equals_float64(capability):
    """The AVX2 and plain x86-64 builds (their float32 loops) in a process on that torch path: tiles of 3 channels
    on AVX2, 4 on x86-64; channel tiles widened once where more than one tile of rows meets them (7 rows), and not
    (1, 2, 4 rows); tails of K; and where the dispatch takes them."""
    assert_passes_on_path(
        capability,
        """
import torch
from hf_vram.kernels import cpu_extension, int8_weight_matmul as m
assert cpu_extension.load() and not m.bf16_dot_available()
# the dispatch sends bfloat16 rows (up to FLOAT_LOOPS_MAX_ROWS) to the float32 loops on the AVX2 path only
expected = m.FLOAT_LOOPS_MAX_ROWS if torch.backends.cpu.get_cpu_capability() == "AVX2" else 0
assert m.max_rows() == expected, m.max_rows()
x16 = torch.randn(16, 576).bfloat16()
assert m.takes(x16, torch.bfloat16) == (expected >= 16) and not m.takes(x16.float(), torch.float32)
assert m.takes(x16, torch.float32) == (expected >= 16)  # bfloat16 rows of a float32 matmul widen exactly
for (rows, n, k) in [(1, 4, 32), (7, 9, 576), (5, 3, 17), (2, 7, 40), (4, 5, 64), (9, 10, 19)]:
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, k, generator=g).to(dtype)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = (torch.rand(n, generator=g) / 50 + 1e-3).to(dtype)
        got, want = m.int8_weight_matmul(x, q, s).double(), m.int8_weight_matmul_reference(x, q, s).double()
        assert ((got - want).abs() <= 1e-2 * want.abs() + 1e-3).all(), (rows, n, k, dtype)
""",
    )
