"""hf_vram's int8 K/V row writer (``csrc/kv_write.cpp``) writes the bytes ``KVCodec.encode`` would, bit for bit, at
the offsets it is given, on every build this machine can run; an offset outside the bytes is refused."""

from __future__ import annotations

import pytest
import torch

from hf_vram.kernels import cpu_extension, kv_write
from hf_vram.kernels.cpu_caps import reachable_capabilities
from hf_vram.kernels.kv_write import quantize_rows_int8
from hf_vram.kvcache.codec import KVCodec
from tests.kernels.cpu_paths import assert_passes_on_path

pytestmark = pytest.mark.skipif(not cpu_extension.compiler_present(), reason="no C++ compiler: torch's path writes")


def _states(n: int, heads: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, heads, dim, generator=g) * torch.logspace(-3, 3, n)[:, None, None]
    x[0] = 0.0  # an all-zero row: scale 0, codes 0
    x[1, 0, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0])  # ties to round half to even, the clamp's edge
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("heads, dim", [(3, 64), (1, 128), (2, 17)])
def test_rows_equal_the_codecs_bit_for_bit_at_their_offsets(dtype, heads, dim):
    n, codec = 40, KVCodec(8, heads, dim)
    states = _states(n, heads, dim, dtype)
    gap = 7  # rows at scattered, unaligned offsets, bytes between them untouched
    offsets = torch.randperm(n, generator=torch.Generator().manual_seed(1)) * (codec.row_bytes + gap) + 3
    bytes_ = torch.full((n * (codec.row_bytes + gap) + 3,), 0xAB, dtype=torch.uint8)
    quantize_rows_int8(states, bytes_, offsets)
    want = codec.encode(states)
    for r in range(n):
        assert torch.equal(bytes_[offsets[r] : offsets[r] + codec.row_bytes], want[r]), r
    written = torch.zeros_like(bytes_, dtype=torch.bool)
    for o in offsets.tolist():
        written[o : o + codec.row_bytes] = True
    assert (bytes_[~written] == 0xAB).all()


def test_an_offset_outside_the_bytes_is_an_error_not_a_write():
    states, codec = _states(4, 3, 64, torch.float32), KVCodec(8, 3, 64)
    bytes_ = torch.zeros(4 * codec.row_bytes, dtype=torch.uint8)
    for bad in (3 * codec.row_bytes + 1, -1):
        with pytest.raises(RuntimeError, match="does not fit the"):
            quantize_rows_int8(states, bytes_, torch.tensor([0, codec.row_bytes, 2 * codec.row_bytes, bad]))
    assert (bytes_ == 0).all()
    with pytest.raises(RuntimeError, match="one per row of states"):
        quantize_rows_int8(states, bytes_, torch.tensor([0]))


@pytest.mark.parametrize("capability", [c for c in ("avx2", "default") if c in reachable_capabilities()])
def test_each_build_writes_the_codecs_bytes(capability):
    assert_passes_on_path(
        capability,
        """
import torch
from hf_vram.kernels.kv_write import quantize_rows_int8
from hf_vram.kvcache.codec import KVCodec
from tests.kernels.test_kv_write import _states
for dtype in (torch.bfloat16, torch.float32):
    states, codec = _states(30, 3, 64, dtype), KVCodec(8, 3, 64)
    bytes_ = torch.zeros(30 * codec.row_bytes, dtype=torch.uint8)
    quantize_rows_int8(states, bytes_, torch.arange(30) * codec.row_bytes)
    assert torch.equal(bytes_.view(30, -1), codec.encode(states)), dtype
""",
    )


def test_only_cpu_states_are_written_by_the_kernel():
    """States on another device (CUDA's continuous batching) take torch's ops: the kernel reads host memory only."""
    assert kv_write.takes(torch.zeros(1, 3, 64))
    assert not kv_write.takes(torch.zeros(1, 3, 64, device="meta"))
