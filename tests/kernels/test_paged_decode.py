"""hf_vram's CPU decode attention over int8 K/V page rows, against the same math in torch ops, on every build this
machine can run (the AVX-512, AVX2 and plain x86-64 builds follow torch's CPU path: ``ATEN_CPU_CAPABILITY``)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels import cpu_extension
from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kernels.paged_decode import kernel_available, paged_decode_int8, paged_decode_int8_reference
from hf_vram.kvcache.codec import KVCodec
from tests.kernels.cpu_paths import assert_passes_on_path

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C++ compiler: the torch path is what runs")


def _case(heads: int, group: int, dim: int, lengths: list[int], dtype=torch.float32, seed: int = 0):
    """int8 page rows of 600 tokens, each sequence's keys a run of whole 16-row pages in shuffled order, the last
    key its fresh token."""
    g = torch.Generator().manual_seed(seed)
    codec = KVCodec(8, heads, dim)
    key_rows = codec.encode(torch.randn(600, heads, dim, generator=g) * 3)
    value_rows = codec.encode(torch.randn(600, heads, dim, generator=g))
    pages = torch.randperm(600 // 16, generator=g)
    order = (pages[:, None] * 16 + torch.arange(16)).reshape(-1)
    read_index = order[: sum(lengths)]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    query = torch.randn(len(lengths), heads, group, dim, generator=g).to(dtype)
    fresh = [torch.randn(len(lengths), heads, dim, generator=g).to(dtype) for _ in range(2)]
    return query, key_rows, value_rows, read_index, starts, torch.tensor(lengths), *fresh


@pytest.mark.parametrize(
    "heads, group, dim",
    [(3, 3, 64), (2, 4, 128), (1, 7, 64), (2, 2, 80), (4, 12, 32)],
    ids=["smollm2", "head 128", "one kv head", "head 80 (portable loop)", "group 12"],
)
def test_kernel_equals_dequantized_attention(heads, group, dim):
    """Pasts of 0, 1, a block's edge (63, 64, 65 keys) and several blocks; every key its own scale."""
    case = _case(heads, group, dim, [1, 2, 64, 65, 66, 130, 200])
    got = paged_decode_int8(*case, scale=dim**-0.5)
    want = paged_decode_int8_reference(*case, scale=dim**-0.5)
    assert got.dtype == torch.float32 and got.shape == case[0].shape
    assert (got - want).abs().max() < 2e-5


def test_bfloat16_queries_and_fresh_states_are_read_in_float32():
    case = _case(3, 3, 64, [40, 9], dtype=torch.bfloat16)
    got = paged_decode_int8(*case, scale=0.125)
    want = paged_decode_int8_reference(*(x.float() if x.dtype == torch.bfloat16 else x for x in case), scale=0.125)
    assert (got - want).abs().max() < 2e-5


def test_large_scores_do_not_overflow():
    """Scores of hundreds (the exponent built in the kernel must saturate to 0, never inf or NaN)."""
    query, *rest = _case(2, 2, 64, [100, 3])
    got = paged_decode_int8(query * 40, *rest, scale=1.0)
    want = paged_decode_int8_reference(query * 40, *rest, scale=1.0)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 1e-3


def test_a_row_outside_the_pages_is_an_error_not_a_read():
    query, key_rows, value_rows, read_index, starts, lengths, fk, fv = _case(3, 3, 64, [10, 20])
    bad = read_index.clone()
    bad[3] = key_rows.shape[0]
    with pytest.raises(RuntimeError, match="outside the 600 page rows"):
        paged_decode_int8(query, key_rows, value_rows, bad, starts, lengths, fk, fv, scale=0.125)
    with pytest.raises(RuntimeError, match=r"reads read_index\[10:30\] of 20"):
        paged_decode_int8(query, key_rows, value_rows, read_index[:20], starts, lengths, fk, fv, scale=0.125)


def test_rows_too_short_for_the_heads_are_refused():
    query, key_rows, *rest = _case(3, 3, 64, [10])
    with pytest.raises(RuntimeError, match="fewer than 3 heads"):
        paged_decode_int8(query, key_rows[:, :100], *rest, scale=0.125)


@pytest.mark.parametrize("capability", reachable_capabilities())
def test_each_build_matches_on_its_cpu_path(capability):
    """In a fresh process on torch's ``capability`` path, the kernel is built for it (AVX-512, AVX2 + FMA, or
    plain x86-64: the intrinsics and the portable loops) and matches the reference."""
    assert_passes_on_path(
        capability,
        "from tests.kernels.test_paged_decode import _case\n"
        "from hf_vram.kernels import cpu_extension\n"
        "from hf_vram.kernels.paged_decode import paged_decode_int8, paged_decode_int8_reference\n"
        f"assert cpu_extension.target_isa() == {cpu_extension.ISA_BY_CAPABILITY[capability]!r}\n"
        "assert cpu_extension.load()\n"
        "for shape in ((3, 3, 64), (2, 4, 128), (2, 2, 80)):\n"
        "    case = _case(*shape, [1, 64, 65, 150])\n"
        "    d = (paged_decode_int8(*case, scale=0.1) - paged_decode_int8_reference(*case, scale=0.1)).abs().max()\n"
        "    assert d < 2e-5, (shape, d)\n",
    )


def test_turned_off_the_reference_answers(monkeypatch):
    monkeypatch.setenv("HF_VRAM_CPU_KERNELS", "0")
    cpu_extension.load.cache_clear()
    try:
        assert not kernel_available()
        case = _case(3, 3, 64, [5, 30])
        assert torch.equal(paged_decode_int8(*case, scale=0.125), paged_decode_int8_reference(*case, scale=0.125))
    finally:
        monkeypatch.delenv("HF_VRAM_CPU_KERNELS")
        cpu_extension.load.cache_clear()
    assert kernel_available()
