"""The Triton decode kernel over continuous batching's quantized page rows (CUDA's twin of the CPU kernel) equals the
torch references under TRITON_INTERPRET=1: int8 ``KVCodec`` rows, and 4/2-bit KIVI rows with their int8 windows."""

from __future__ import annotations

import os

import pytest
import torch

from hf_vram.kernels import triton_paged_rows
from hf_vram.kernels.paged_decode import paged_decode_int8_reference
from hf_vram.kernels.triton_paged_rows import HAVE_TRITON, paged_decode_int8_triton, paged_decode_kivi_triton
from tests.kernels.test_paged_decode import KIVI_FORMAT_IDS, KIVI_FORMATS, _case, _kivi_case


def test_runs_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" and HAVE_TRITON


@pytest.mark.parametrize(
    "heads, group, dim", [(3, 3, 64), (2, 4, 128), (2, 2, 80)], ids=["smollm2", "head 128", "head 80 (padded)"]
)
def test_int8_rows_equal_the_reference(heads, group, dim):
    """Pasts of 0, 1, a page's edge and several pages in shuffled order; G=3 query rows pad to 4."""
    case = _case(heads, group, dim, [1, 2, 17, 64, 130])
    got = paged_decode_int8_triton(*case, scale=dim**-0.5)
    want = paged_decode_int8_reference(*case, scale=dim**-0.5)
    assert got.dtype == torch.float32 and got.shape == case[0].shape
    assert (got - want).abs().max() < 2e-5


def test_int8_rows_take_bfloat16_queries_and_fresh_states():
    case = _case(3, 3, 64, [40, 9], dtype=torch.bfloat16)
    got = paged_decode_int8_triton(*case, scale=0.125)
    want = paged_decode_int8_reference(*(x.float() if x.dtype == torch.bfloat16 else x for x in case), scale=0.125)
    assert (got - want).abs().max() < 2e-5


@pytest.mark.parametrize(("bits", "row_scale"), KIVI_FORMATS, ids=KIVI_FORMAT_IDS)
@pytest.mark.parametrize("pairs", [32, 16, None], ids=["rope", "partial rope", "no rope"])
def test_kivi_rows_equal_the_codec_read(bits, row_scale, pairs):
    """Keys per channel over their group (meta spread over the group's key rows, then its value rows) turned forward
    by their position, values per token, windowed groups read from their int8 rows: as the codec decodes them, then
    float32 attention."""
    args, want = _kivi_case(bits, pairs, [1, 40, 130], windowed_groups={1, 3}, row_scale=row_scale)
    got = paged_decode_kivi_triton(*args)
    assert (got - want).abs().max() < 5e-5


@pytest.mark.parametrize(("heads", "group_q", "dim", "pairs"), [(2, 1, 128, 64), (1, 9, 64, 32), (2, 2, 80, 40)])
def test_kivi_rows_for_other_shapes(heads, group_q, dim, pairs):
    for bits, row_scale in KIVI_FORMATS:
        args, want = _kivi_case(bits, pairs, [1, 70], {1}, heads=heads, group_q=group_q, dim=dim, row_scale=row_scale)
        assert (paged_decode_kivi_triton(*args) - want).abs().max() < 5e-5, (bits, row_scale)


def test_large_scores_do_not_overflow():
    query, *rest = _case(2, 2, 64, [100, 3])
    got = paged_decode_int8_triton(query * 40, *rest, scale=1.0)
    want = paged_decode_int8_reference(query * 40, *rest, scale=1.0)
    assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-3


def test_eight_bit_is_not_a_kivi_width():
    args, _ = _kivi_case(4, None, [5], set())
    with pytest.raises(ValueError, match="4 or 2 bits"):
        paged_decode_kivi_triton(*args[:15], 8, *args[16:])


def test_rows_that_are_not_the_allocators_uint8_rows_are_refused():
    query, key_rows, value_rows, *rest = _case(3, 3, 64, [10])
    with pytest.raises(ValueError, match="one row stride"):
        paged_decode_int8_triton(query, key_rows, value_rows[:, :-2].contiguous(), *rest, scale=0.125)
    with pytest.raises(ValueError, match="a row must hold 198 bytes.*value_rows 196"):
        paged_decode_int8_triton(query, key_rows, value_rows[:, :-2], *rest, scale=0.125)
    with pytest.raises(ValueError, match="uint8 page rows with contiguous bytes"):
        paged_decode_int8_triton(query, key_rows, value_rows.float(), *rest, scale=0.125)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rows_shared_by_several_programs_merge_to_the_same_attention(monkeypatch, bits):
    """Flash-decoding: with the SMs to fill, programs share each decode's rows (strided blocks, empty shares for
    short pasts) and their softmax states merge to what one program per decode computes, the own token counted once."""
    lengths = [1, 2, 17, 64, 130, 300]
    monkeypatch.setattr(triton_paged_rows, "DECODE_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(triton_paged_rows, "_MIN_BLOCKS_PER_SPLIT", 1)
    heads = 2 if bits == 8 else 3  # _kivi_case's default head count
    if bits == 8:
        case = _case(heads, 3, 64, lengths)
        rows = case[3].numel()
        got = paged_decode_int8_triton(*case, scale=0.125)
        want = paged_decode_int8_reference(*case, scale=0.125)
        tol = 2e-5
    else:
        args, want = _kivi_case(bits, 32, lengths, windowed_groups={1, 3}, heads=heads)
        rows = args[3].numel()
        got = paged_decode_kivi_triton(*args)
        tol = 5e-5
    assert triton_paged_rows.splits_for(len(lengths), heads, rows, torch.device("cpu")) > 1
    assert (got - want).abs().max() < tol


def test_the_split_follows_the_idle_sms_and_can_be_turned_off(monkeypatch):
    cpu = torch.device("cpu")
    assert triton_paged_rows.splits_for(4, 1, 4 * 1024, cpu) == 4  # 16 programs wanted on 4 pretend SMs
    assert triton_paged_rows.splits_for(4, 1, 4 * 16, cpu) == 1  # one row block each: nothing to share
    assert triton_paged_rows.splits_for(32, 2, 32 * 1024, cpu) == 1  # the SMs are busy already
    monkeypatch.setattr(triton_paged_rows, "DECODE_PROGRAMS_PER_SM", 0)
    assert triton_paged_rows.splits_for(4, 1, 4 * 1024, cpu) == 1
