"""The block pool's allocator: invariants over random operation sequences, prefix lookup, exhaustion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_vram.kvcache import KVCachePool, PoolExhaustedError
from hf_vram.kvcache.pool import LayerShape

BS = 4


def _pool(num_blocks: int = 12, dtype=torch.float32) -> KVCachePool:
    return KVCachePool([LayerShape(2, 3), LayerShape(1, 3)], num_blocks=num_blocks, block_size=BS, dtype=dtype)


class _Seq:
    """A sequence as a client of the pool holds it: a block list and the values it wrote, token by token."""

    def __init__(self, blocks=None, values=None) -> None:
        self.blocks = blocks or []
        self.values = values or []


def _append(pool: KVCachePool, seq: _Seq, value: float) -> None:
    position = len(seq.values)
    if position // BS == len(seq.blocks):
        seq.blocks += pool.allocate(1)
    elif pool.refcount(seq.blocks[-1]) > 1:
        seq.blocks[-1] = pool.copy_on_write(seq.blocks[-1])
    slot = torch.tensor([seq.blocks[-1] * BS + position % BS])
    k = torch.full((2, 1, 3), value)  # [heads, tokens, dim]
    pool.write(0, slot, k, -k)
    pool.note_fill(seq.blocks[-1], position % BS + 1)
    seq.values.append(value)


def _content(pool: KVCachePool, seq: _Seq) -> list[float]:
    slots = torch.tensor([seq.blocks[p // BS] * BS + p % BS for p in range(len(seq.values))], dtype=torch.long)
    k, v = pool.gather(0, slots, torch.float32)
    assert torch.equal(v, -k)
    return k[0, :, 0].tolist()


ops = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "drop", "truncate"]), st.integers(0, 10**6)), max_size=120)


@settings(max_examples=120, deadline=None)
@given(ops=ops)
def test_random_operations_keep_every_invariant(ops):
    """Thousands of random allocate/append/fork/drop/truncate steps: no leak, no double free, exact refcounts,
    and no sequence ever sees another's write (shared blocks are copied before they are written)."""
    _run_ops(ops)


def test_ten_thousand_random_operations_in_one_run():
    """One long life of the pool (the hypothesis runs are many short ones): 10,000 operations, checked after each."""
    import random

    rng = random.Random(1234)
    names = ["new", "append", "append", "append", "fork", "drop", "truncate"]
    _run_ops([(rng.choice(names), rng.randrange(10**6)) for _ in range(10_000)], num_blocks=40, content_every=50, max_seqs=12)


def _run_ops(ops: list[tuple[str, int]], num_blocks: int = 12, content_every: int = 1, max_seqs: int = 10**9) -> None:
    pool = _pool(num_blocks)
    seqs: list[_Seq] = []
    counter = 0.0
    for step, (op, arg) in enumerate(ops):
        try:
            if (op == "new" and len(seqs) < max_seqs) or not seqs:
                seqs.append(_Seq())
                continue
            seq = seqs[arg % len(seqs)]
            if op == "append":
                counter += 1
                _append(pool, seq, counter)
            elif op == "fork":
                pool.incref(seq.blocks)
                seqs.append(_Seq(list(seq.blocks), list(seq.values)))
            elif op == "drop":
                pool.free(seq.blocks)
                seqs.remove(seq)
            elif op == "truncate" and seq.values:
                keep = arg % len(seq.values)
                n_blocks = -(-keep // BS)
                if seq.blocks[n_blocks:]:
                    pool.free(seq.blocks[n_blocks:])
                del seq.blocks[n_blocks:]
                del seq.values[keep:]
        except PoolExhaustedError:
            pass  # all or nothing: the failed step changed nothing
        pool.check_invariants([s.blocks for s in seqs])
        if step % content_every == 0:
            for s in seqs:
                assert _content(pool, s) == s.values
    for s in seqs:
        pool.free(s.blocks)
    pool.check_invariants([])
    assert pool.blocks_used == 0 and pool.stats()["tokens_stored"] == 0


def test_double_free_and_sharing_a_free_block_are_refused():
    pool = _pool()
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.incref([b])


def test_exhaustion_is_all_or_nothing_and_names_the_fix():
    pool = _pool(num_blocks=5)
    pool.allocate(3)
    with pytest.raises(PoolExhaustedError, match="2 block\\(s\\) needed, 1 free of 4.*generate_batch"):
        pool.allocate(2)
    assert pool.blocks_free == 1


def test_prefix_lookup_takes_a_reference_and_dies_with_the_block():
    pool = _pool()
    (b,) = pool.allocate(1)
    pool.register(123, b)
    assert pool.lookup(123) == b and pool.refcount(b) == 2
    assert pool.stats()["shared_blocks"] == 1
    pool.free([b, b])
    assert pool.lookup(123) is None  # freed blocks are not found again


def test_int8_storage_round_trips_within_a_step_and_is_smaller():
    pool = _pool(dtype="int8")
    (b,) = pool.allocate(1)
    k = torch.randn(2, BS, 3)
    slots = torch.arange(b * BS, (b + 1) * BS)
    pool.write(0, slots, k, k * 2)
    k2, v2 = pool.gather(0, slots, torch.float32)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert ((k2 - k).abs() <= step / 2 + 1e-6).all() and ((v2 - 2 * k).abs() <= step + 1e-6).all()
    shapes = [LayerShape(3, 64)]  # SmolLM2's per-layer shape: int8 codes + one fp32 scale per token and head
    int8 = KVCachePool.bytes_per_block_for(shapes, 16, "int8")
    assert int8 / KVCachePool.bytes_per_block_for(shapes, 16, "float32") == pytest.approx((64 + 4) / 256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 12}, "block_size=12 is invalid"),
        ({"num_blocks": 1}, "num_blocks=1 is invalid"),
        ({"dtype": "int4"}, "dtype='int4' is invalid"),
    ],
)
def test_bad_pool_settings(kwargs, message):
    args = {"num_blocks": 8, "block_size": 4, "dtype": torch.float32, **kwargs}
    with pytest.raises(ValueError, match=message):
        KVCachePool([LayerShape(1, 2)], **args)
