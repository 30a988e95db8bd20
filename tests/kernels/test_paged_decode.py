"""hf_vram's CPU decode attention over int8 K/V page rows, against the same math in torch ops, on every build this
machine can run (the AVX-512, AVX2 and plain x86-64 builds follow torch's CPU path: ``ATEN_CPU_CAPABILITY``)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels import cpu_extension
from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kernels.paged_decode import kernel_available, paged_decode_int8, paged_decode_int8_reference, paged_decode_kivi
from hf_vram.kvcache.codec import KVCodec
from tests.kernels.cpu_paths import assert_passes_on_path

# Only a machine without a C++ compiler skips these (the torch path is what runs there); where one is, a kernel that
# does not build fails test_the_kernel_builds_where_a_compiler_is instead of skipping the rest.
pytestmark = pytest.mark.skipif(not cpu_extension.compiler_present(), reason="no C++ compiler: the torch path runs")


def test_the_kernel_builds_where_a_compiler_is():
    assert kernel_available(), "hf_vram's CPU kernel failed to build with the compiler on PATH (see the warning)"


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
    """In a fresh process on torch's ``capability`` path, the kernels are built for it (AVX-512, AVX2 + FMA, or
    plain x86-64: the intrinsics and the portable loops) and match the references, int8 and int4/int2 pages (the
    register-resident path at head sizes 64 and 128 with up to 8 query rows per KV head, its general loop past)."""
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
        "    assert d < 2e-5, (shape, d)\n"
        "from tests.kernels.test_paged_decode import KIVI_FORMATS, _kivi_case\n"
        "from hf_vram.kernels.paged_decode import paged_decode_kivi\n"
        "for bits, rs in KIVI_FORMATS:\n"
        "    args, want = _kivi_case(bits, 32, [1, 40, 130], windowed_groups={1}, row_scale=rs)\n"
        "    assert (paged_decode_kivi(*args) - want).abs().max() < 5e-5, bits\n"
        "    for heads, group_q, dim, pairs in ((2, 4, 128, 64), (1, 8, 64, None), (1, 9, 64, 32)):\n"
        "        args, want = _kivi_case(bits, pairs, [1, 70], {1}, heads=heads, group_q=group_q, dim=dim, row_scale=rs)\n"
        "        assert (paged_decode_kivi(*args) - want).abs().max() < 5e-5, (bits, rs, dim, group_q)\n",
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


# KIVI row formats the kernels read: int4 (one symmetric scale a value row, key meta in the value rows too), int4
# with a (scale, low) per head (an int4 layer in unturned int2 pages), int2
KIVI_FORMATS = [(4, None), (4, False), (2, None)]
KIVI_FORMAT_IDS = ["int4", "int4 scale and low per head", "int2"]


def _kivi_case(
    bits: int,
    pairs: int | None,
    lengths: list[int],
    windowed_groups: set[int],
    seed: int = 0,
    heads: int = 3,
    group_q: int = 3,
    dim: int = 64,
    row_scale: bool | None = None,
):
    """KIVI pages (``row_scale``: ``WindowedKVCodec``'s) of the key groups the sequences need and 2 more (64 rows each, in shuffled order), each sequence's tokens in whole groups at
    positions 0, 1, ...; the groups in ``windowed_groups`` (by index in the whole read) answered by int8 window rows
    at scattered offsets. Returns the kernel's arguments and the float32 reference output."""
    from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec
    from hf_vram.kvcache.rope_frame import RopeFrame

    g = torch.Generator().manual_seed(seed)
    frame = None if pairs is None else RopeFrame(1.0 / 10000 ** (torch.arange(pairs) / pairs), dim)
    codec = WindowedKVCodec(bits, heads, dim, GROUP, frame, row_scale)
    window_codec = KVCodec(8, heads, dim)
    groups_total = sum(-(-n // GROUP) for n in lengths) + 2
    key_rows = torch.zeros(groups_total * GROUP, codec.row_bytes, dtype=torch.uint8)
    value_rows = torch.zeros_like(key_rows)
    window = torch.zeros(4096 * window_codec.row_bytes, dtype=torch.uint8)
    free_groups = torch.randperm(groups_total, generator=g).tolist()
    read_index, positions, window_keys, window_values, past_k, past_v = [], [], [], [], [], []
    window_slot = 7
    for length in lengths:
        ks, vs = [], []
        for g0 in range(0, length, GROUP):
            gid = free_groups.pop()
            wide = 1 + 4 * (torch.rand(dim, generator=g) > 0.8)  # some channels 5x: 2-bit keys of 0, 2 and 4 bits
            keys = torch.randn(1, GROUP, heads, dim, generator=g) * 2 * wide
            values = torch.randn(GROUP, heads, dim, generator=g)
            start = torch.tensor([g0])
            rows = torch.arange(gid * GROUP, (gid + 1) * GROUP)
            key_rows[rows], value_rows[rows] = codec.encode(keys, values, start)
            k = codec.decode_keys(key_rows[rows], value_rows[rows], torch.float32, starts=start)
            v = codec.decode_values(value_rows[rows], torch.float32)
            windowed = len(read_index) // GROUP in windowed_groups
            n = min(GROUP, length - g0)
            for i in range(n):
                read_index.append(int(rows[i]))
                positions.append(g0 + i)
                at = [-1, -1]
                if windowed:
                    for kv, x, out in ((0, keys[0, i], k), (1, values[i], v)):
                        offset = window_slot * window_codec.row_bytes
                        window_slot += 3
                        row = window_codec.encode(x[None])
                        window[offset : offset + row.shape[1]] = row[0]
                        out[i] = window_codec.decode(row, torch.float32)[0]
                        at[kv] = offset
                window_keys.append(at[0])
                window_values.append(at[1])
            ks.append(k[:n])
            vs.append(v[:n])
        past_k.append(torch.cat(ks))
        past_v.append(torch.cat(vs))
    n_seq = len(lengths)
    query = torch.randn(n_seq, heads, group_q, dim, generator=g)
    fresh_k, fresh_v = (torch.randn(n_seq, heads, dim, generator=g) for _ in range(2))
    # each sequence's last read row is its own new token: the kernel takes it from fresh_k / fresh_v
    want = torch.empty(query.shape)
    for s in range(n_seq):
        k = torch.cat([past_k[s][:-1], fresh_k[s : s + 1]]).transpose(0, 1)
        v = torch.cat([past_v[s][:-1], fresh_v[s : s + 1]]).transpose(0, 1)
        want[s] = torch.nn.functional.scaled_dot_product_attention(query[s], k, v, scale=0.125)
    if frame is not None:
        cos, sin = frame.angles(torch.arange(max(lengths)), torch.float32)
        tables = (cos.reshape(max(lengths), dim), sin.reshape(max(lengths), dim), frame.pairs)
    else:
        tables = (torch.empty(0), torch.empty(0), 0)
    args = (
        query, key_rows, value_rows, torch.tensor(read_index), torch.tensor(positions),
        torch.tensor([0, *lengths[:-1]]).cumsum(0), torch.tensor(lengths), window,
        torch.tensor(window_keys), torch.tensor(window_values), tables[0], tables[1], fresh_k, fresh_v, 0.125,
        bits, GROUP, codec.code_bytes, codec.key_meta_bytes, codec.value_group, tables[2],
    )  # fmt: skip
    return args, want


@pytest.mark.parametrize(("bits", "row_scale"), KIVI_FORMATS, ids=KIVI_FORMAT_IDS)
@pytest.mark.parametrize("pairs", [32, 16, None], ids=["rope", "partial rope", "no rope"])
def test_kivi_kernel_equals_the_codec_read(bits, row_scale, pairs):
    """Keys dequantized per channel over their group and turned forward by their position, values per token, rows
    the window holds read there as int8: the kernel equals the codec's own decoding followed by float32 attention,
    for sequences of one token, part of a group, and several groups with windowed groups among them."""
    args, want = _kivi_case(bits, pairs, [1, 40, 130, 250], windowed_groups={1, 3, 6}, row_scale=row_scale)
    got = paged_decode_kivi(*args)
    assert (got - want).abs().max() < 5e-5


@pytest.mark.parametrize(
    ("heads", "group_q", "dim", "pairs"),
    [(2, 1, 128, 64), (1, 4, 128, None), (2, 8, 64, 32), (1, 9, 64, 32), (2, 2, 80, 40)],
    ids=["d128-g1", "d128-g4-no-rope", "d64-g8", "d64-g9", "d80"],
)
def test_kivi_kernel_equals_the_codec_read_for_other_shapes(heads, group_q, dim, pairs):
    """Head sizes 64 and 128 with up to 8 query rows per KV head take the kernel's register-resident path (keys
    decoded and turned in registers, values' codes multiplied into the output with their scale folded into the
    weight); 9 rows and head size 80 its general loop: every one equals the codec's read."""
    for bits, row_scale in KIVI_FORMATS:
        args, want = _kivi_case(bits, pairs, [1, 70, 200], {1, 3}, heads=heads, group_q=group_q, dim=dim, row_scale=row_scale)
        assert (paged_decode_kivi(*args) - want).abs().max() < 5e-5, (bits, row_scale)


def test_kivi_kernel_refuses_a_window_offset_past_its_bytes():
    args, _ = _kivi_case(4, 32, [70], windowed_groups={0})
    bad = list(args)
    bad[8] = args[8].clone()
    bad[8][5] = args[7].numel()
    with pytest.raises(RuntimeError, match="outside the window"):
        paged_decode_kivi(*bad)
    bad = list(args)
    bad[4] = args[4] + 1000
    with pytest.raises(RuntimeError, match="has no rotary angle"):
        paged_decode_kivi(*bad)
