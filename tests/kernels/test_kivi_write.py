"""hf_vram's KIVI group sealer (``csrc/kivi_write.cpp``) writes the rows ``WindowedKVCodec`` writes from the same int8
rows read as the model's dtype holds them: every byte equal but, at most, a code at an exact rounding tie (a fused
multiply-add in the rotary turn), for int4 and int2 (clipped keys), with and without a rotary frame, in float32,
bfloat16 and float16; offsets outside the bytes are refused."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels import cpu_extension, kivi_write, kv_write
from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.kivi import GROUP, WindowedKVCodec
from hf_vram.kvcache.rope_frame import RopeFrame
from tests.kernels.cpu_paths import assert_passes_on_path

pytestmark = pytest.mark.skipif(not cpu_extension.compiler_present(), reason="no C++ compiler: torch's path seals")


def _case(
    bits: int,
    pairs: int | None,
    dtype: torch.dtype,
    groups: int = 3,
    heads: int = 3,
    dim: int = 64,
    row_scale: bool | None = None,
):
    """``groups`` groups of int8 K/V rows at scattered offsets of one byte buffer (keys with outlier channels), the
    codec, the groups' first positions, and the codec's own rows from the same int8 rows read in ``dtype``."""
    g = torch.Generator().manual_seed(bits + (pairs or 0))
    frame = None if pairs is None else RopeFrame(1.0 / 10000 ** (torch.arange(pairs) / pairs), dim)
    codec, int8 = WindowedKVCodec(bits, heads, dim, GROUP, frame, row_scale), KVCodec(8, heads, dim)
    n = groups * GROUP
    keys = torch.randn(n, heads, dim, generator=g) * (1 + 9 * (torch.rand(dim, generator=g) > 0.9))
    values = torch.randn(n, heads, dim, generator=g)
    keys[:GROUP, 0] = 0.0  # a channel range of zero: scale 0
    slots = torch.randperm(2 * n + 5, generator=g)[: 2 * n]
    offsets = slots * int8.row_bytes + 1
    bytes_ = torch.zeros((2 * n + 5) * int8.row_bytes + 1, dtype=torch.uint8)
    kv_write.quantize_rows_int8(keys.to(dtype), bytes_, offsets[:n])
    kv_write.quantize_rows_int8(values.to(dtype), bytes_, offsets[n:])
    starts = torch.tensor([0, 5 * GROUP, 2 * GROUP])[:groups]

    def read(at):
        return torch.stack([int8.decode(bytes_[o : o + int8.row_bytes].clone()[None], dtype)[0] for o in at.tolist()])

    want_keys, want_values = codec.encode(read(offsets[:n]).reshape(groups, GROUP, heads, dim), read(offsets[n:]), starts)
    return codec, bytes_, offsets[:n], offsets[n:], starts, want_keys, want_values


def _agree(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], codec: WindowedKVCodec) -> None:
    """(key rows, value rows): the value rows' codes and own meta equal; the key groups' meta (key rows, then the
    rest of the value rows) equal as float16 numbers (a zero channel's low may be +0 or -0: which zero a minimum
    keeps); key codes equal but for at most one in 2000, off by one level."""
    own = codec.code_bytes + codec.value_meta_bytes
    assert torch.equal(got[1][:, :own], want[1][:, :own])  # values: no turn, every operation the codec's
    meta = [
        codec.group_meta(k.view(-1, GROUP, codec.row_bytes), v.view(-1, GROUP, codec.row_bytes)).float() for k, v in (got, want)
    ]
    assert torch.equal(meta[0], meta[1])
    from hf_vram.kvcache.codec import unpack_to

    a, b = (unpack_to(x[0][:, : codec.code_bytes].contiguous(), codec.bits, torch.float32) for x in (got, want))
    assert (a - b).abs().max() <= 1
    assert (a != b).float().mean() <= 1 / 2000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("pairs", [32, 16, None], ids=["rope", "partial rope", "no rope"])
@pytest.mark.parametrize("bits", [4, 2])
def test_sealed_rows_equal_the_codecs(bits, pairs, dtype):
    codec, bytes_, key_at, value_at, starts, want_keys, want_values = _case(bits, pairs, dtype)
    got = kivi_write.encode_from_int8(codec, bytes_, key_at, value_at, codec.seal_tables(starts), dtype)
    assert codec.value_group == (0 if bits == 4 else 64)  # int4: one symmetric scale a value row
    assert codec.meta_bytes > codec.value_meta_bytes or bits == 2  # int4: key meta in the value rows too
    _agree(got, (want_keys, want_values), codec)


@pytest.mark.parametrize("row_scale", [False, True], ids=["scale and low per 16 channels", "one scale a row"])
def test_a_head_size_the_codec_groups_in_16s(row_scale):
    case = _case(4, 40, torch.float32, groups=2, heads=2, dim=80, row_scale=row_scale)
    codec, bytes_, key_at, value_at, starts, want_keys, want_values = case
    got = kivi_write.encode_from_int8(codec, bytes_, key_at, value_at, codec.seal_tables(starts), torch.float32)
    assert codec.value_group == (0 if row_scale else 16)
    _agree(got, (want_keys, want_values), codec)


def test_an_offset_outside_the_bytes_or_a_part_group_is_refused():
    codec, bytes_, key_at, value_at, starts, *_ = _case(4, 32, torch.float32, groups=1)
    tables = codec.seal_tables(starts)
    bad = key_at.clone()
    bad[3] = bytes_.numel()
    with pytest.raises(RuntimeError, match="outside the"):
        kivi_write.encode_from_int8(codec, bytes_, bad, value_at, tables, torch.float32)
    with pytest.raises(RuntimeError, match="whole groups"):
        kivi_write.encode_from_int8(codec, bytes_, key_at[:10], value_at[:10], tables, torch.float32)


@pytest.mark.parametrize("capability", [c for c in ("avx2", "default") if c in reachable_capabilities()])
def test_each_build_seals_like_the_codec(capability):
    assert_passes_on_path(
        capability,
        """
import torch
from hf_vram.kernels import kivi_write
from tests.kernels.test_kivi_write import _agree, _case
for bits in (4, 2):
    codec, bytes_, key_at, value_at, starts, want_keys, want_values = _case(bits, 32, torch.bfloat16)
    got = kivi_write.encode_from_int8(codec, bytes_, key_at, value_at, codec.seal_tables(starts), torch.bfloat16)
    _agree(got, (want_keys, want_values), codec)
""",
    )
