"""``PooledKVCache``: a Transformers ``Cache`` whose tokens live in a ``KVCachePool``.

Use it like any cache: ``model.generate(ids, cache=PooledKVCache(pool))``. Per batch row it keeps a
block table; the model's attention gets the usual ``[batch, heads, tokens, dim]`` tensors, gathered from the
pool (the CPU path), laid out exactly as ``DynamicCache`` lays them out, so the model's own mask applies.

- Left padding is not stored: pad positions are detected from the prefill's position ids (a row's real tokens are
  numbered 0..n-1 after its pads) and read from the pool's zero block, which the mask hides.
- Prompt prefixes are shared: each full block of a prompt is hashed (with the hash of the blocks before it) over
  its layer-0 keys and values, which are a function of the tokens and their positions; a block already in the pool
  under that hash is referenced instead of stored again. A block is published only after every layer wrote it.
- Beam search (``reorder_cache``), ``num_return_sequences`` (``batch_repeat_interleave``) and
  ``batch_select_indices`` fork block tables by reference; a write into a shared block copies it first.
- Blocks go back to the pool on ``release()`` (also when the cache is garbage-collected or used as a context
  manager); allocation for a step is all or nothing, so an exhausted pool raises and corrupts nothing.
- ``paged_attention=True`` (with the model on ``attn_implementation="hf_vram_paged"``) skips the gather on decode
  steps: the attention reads the pool through the block tables with the Triton kernel (the CUDA path).
- Prefill returns the new keys/values as computed (as DynamicCache does); later steps read the pool, so with
  ``int8`` storage only the past is quantized.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from hf_vram.kvcache.paged_attention import PagedStep, clear_step, set_step
from hf_vram.kvcache.pool import NULL_BLOCK, KVCachePool


@dataclass
class _Row:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # real tokens stored
    pad: int = 0  # left-pad positions in the attention layout, never stored


def _release_rows(pool: KVCachePool, rows: list[_Row]) -> None:
    blocks = [b for row in rows for b in row.blocks]
    if blocks:
        pool.free(blocks)
    rows.clear()


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes, for any dtype (numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _pads_from_positions(position_ids: torch.Tensor | None, batch: int, q_len: int) -> list[int]:
    """Left pads per row, from the prefill's position ids.

    Transformers numbers a left-padded row's real tokens 0..n-1 after its pads, so the row has ``q_len - n`` pads.
    A row whose tail is not exactly 0..n-1 (custom positions) is taken as unpadded: storing a pad wastes a slot,
    while dropping a real token would change the output.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != q_len:
        return [0] * batch
    pos = (position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids).cpu()
    pads = []
    for row in pos:
        real = int(row.max()) + 1
        pad = q_len - real
        ok = 0 <= pad and torch.equal(row[pad:], torch.arange(real, dtype=row.dtype))
        pads.append(pad if ok else 0)
    return pads


class PooledKVCache(Cache):
    """A cache over a shared block pool; see the module docstring. ``pad_lengths`` overrides pad detection."""

    def __init__(self, pool: KVCachePool, pad_lengths: list[int] | None = None, paged_attention: bool = False) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.paged_attention = paged_attention
        self.num_layers = len(pool.layers)
        self.rows: list[_Row] = []
        self.written = [0] * self.num_layers
        self._pad_override = pad_lengths
        self._step: dict | None = None
        self._finalizer = weakref.finalize(self, _release_rows, pool, self.rows)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Return every block of every row to the pool; the cache is empty afterwards."""
        if self.paged_attention:
            clear_step()
        _release_rows(self.pool, self.rows)
        self.written = [0] * self.num_layers
        self._step = None

    def __enter__(self) -> PooledKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def reset(self) -> None:
        self.release()

    # -- what masking and generate ask -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.written[layer_idx] if layer_idx < self.num_layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return len(self.rows) if self.rows else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.rows)

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    def block_tables(self) -> list[list[int]]:
        return [list(r.blocks) for r in self.rows]

    # -- the write/read path ---------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        batch, heads, q_len, dim = key_states.shape
        if layer_idx == 0:
            inner = kwargs.get("kwargs") or {}
            self._plan(key_states, value_states, inner.get("position_ids", kwargs.get("position_ids")))
        step = self._step
        if step["write_src"].numel():
            idx = step["write_src"]  # positions of the flattened (batch, token) axis to store
            flat_k = key_states.transpose(0, 1).reshape(heads, batch * q_len, dim).index_select(1, idx)
            flat_v = value_states.transpose(0, 1).reshape(heads, batch * q_len, dim).index_select(1, idx)
            self.pool.write(layer_idx, step["write_slots"], flat_k, flat_v)
        past = self.written[layer_idx]
        self.written[layer_idx] = past + q_len
        if layer_idx == self.num_layers - 1:
            for content_hash, block in step["publish"]:
                self.pool.register(content_hash, block)
        if past == 0:
            return key_states, value_states
        if self.paged_attention:
            paged = q_len == 1 and not self.pool.sliding[layer_idx]
            set_step(self._paged_step(layer_idx) if paged else None)
            if paged:  # the hf_vram_paged attention reads the pool through the block tables
                return key_states, value_states
        return self.pool.gather(layer_idx, step["gather_slots"].view(batch, past + q_len), key_states.dtype)

    def _paged_step(self, layer: int) -> PagedStep:
        step = self._step
        if "tables" not in step:
            width = max(len(r.blocks) for r in self.rows)
            tables = torch.zeros(len(self.rows), width, dtype=torch.int32)
            for i, r in enumerate(self.rows):
                tables[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
            step["tables"] = tables.to(self.pool.device)
            step["lens"] = torch.tensor([r.length for r in self.rows], dtype=torch.int32, device=self.pool.device)
        pool = self.pool
        return PagedStep(
            layer,
            pool.keys[layer],
            pool.values[layer],
            pool.key_scales[layer] if pool.quantized else None,
            pool.value_scales[layer] if pool.quantized else None,
            step["tables"],
            step["lens"],
            pool.block_size,
        )

    def _slot(self, row: _Row, position: int) -> int:
        return row.blocks[position // self.pool.block_size] * self.pool.block_size + position % self.pool.block_size

    def _plan(self, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Layer 0 of a forward: take blocks for the new tokens (all or nothing) and plan writes and gathers."""
        batch, _, q_len, _ = k.shape
        prefill = not self.rows
        if prefill:
            pads = self._pad_override or _pads_from_positions(position_ids, batch, q_len)
            if len(pads) != batch or any(p < 0 or p > q_len for p in pads):
                raise ValueError(f"hf_vram kv cache: pad_lengths {pads} do not fit a batch of {batch} x {q_len} tokens.")
            new_rows = [_Row(pad=p) for p in pads]
        elif batch != len(self.rows):
            raise ValueError(f"hf_vram kv cache: the cache holds {len(self.rows)} sequences, the step has {batch}.")
        taken: list[int] = []
        write_src: list[int] = []
        write_slots: list[int] = []
        publish: list[tuple[int, int]] = []
        try:
            if prefill:
                pending: dict[int, int] = {}
                for r, row in enumerate(new_rows):
                    self._prefill_row(r, row, k, v, q_len, taken, write_src, write_slots, publish, pending)
                self.rows.extend(new_rows)
            else:
                for r, row in enumerate(self.rows):
                    self._decode_row(r, row, q_len, taken, write_src, write_slots)
        except BaseException:
            if taken:
                self.pool.free(taken)
            if prefill:
                self.rows.clear()
            raise
        gather = None
        if not prefill:
            gather = torch.cat([self._row_slots(row) for row in self.rows])
        device = self.pool.device
        self._step = {
            "write_src": torch.tensor(write_src, dtype=torch.long, device=k.device),
            "write_slots": torch.tensor(write_slots, dtype=torch.long, device=device),
            "gather_slots": gather,
            "publish": publish,
        }

    def _prefill_row(self, r, row, k, v, q_len, taken, write_src, write_slots, publish, pending) -> None:
        bs = self.pool.block_size
        real = q_len - row.pad
        n_blocks = -(-real // bs)
        parent = b""
        for j in range(n_blocks):
            lo, hi = row.pad + j * bs, min(row.pad + (j + 1) * bs, q_len)
            full = hi - lo == bs
            block = None
            if full:
                digest = hashlib.blake2b(parent, digest_size=16)
                digest.update(_raw_bytes(k[r, :, lo:hi]))
                digest.update(_raw_bytes(v[r, :, lo:hi]))
                parent = digest.digest()
                content_hash = int.from_bytes(parent, "little")
                block = self.pool.lookup(content_hash)
                if block is None and content_hash in pending:
                    block = pending[content_hash]
                    self.pool.incref([block])
                if block is not None:
                    taken.append(block)
                    row.blocks.append(block)
                    continue
            (block,) = self.pool.allocate(1)
            taken.append(block)
            row.blocks.append(block)
            self.pool.note_fill(block, hi - lo)
            write_src.extend(range(r * q_len + lo, r * q_len + hi))
            write_slots.extend(range(block * bs, block * bs + hi - lo))
            if full:
                pending[content_hash] = block
                publish.append((content_hash, block))
        row.length = real

    def _decode_row(self, r, row, q_len, taken, write_src, write_slots) -> None:
        bs = self.pool.block_size
        for t in range(q_len):
            position = row.length + t
            index = position // bs
            if index == len(row.blocks):
                (block,) = self.pool.allocate(1)
                taken.append(block)
                row.blocks.append(block)
            elif self.pool.refcount(row.blocks[index]) > 1:  # shared: copy before writing
                row.blocks[index] = self.pool.copy_on_write(row.blocks[index])
            self.pool.note_fill(row.blocks[index], position % bs + 1)
            write_src.append(r * q_len + t)
            write_slots.append(self._slot(row, position))
        row.length += q_len

    def _row_slots(self, row: _Row) -> torch.Tensor:
        bs = self.pool.block_size
        blocks = torch.tensor(row.blocks, dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).flatten()[: row.length]
        if row.pad:
            slots = torch.cat([torch.full((row.pad,), NULL_BLOCK * bs, dtype=torch.long), slots])
        return slots.to(self.pool.device)

    # -- forks and cuts --------------------------------------------------------------------------------------
    def _replace_rows(self, new_rows: list[_Row]) -> None:
        self.pool.incref([b for row in new_rows for b in row.blocks])
        old = list(self.rows)
        self.rows[:] = new_rows
        _release_rows(self.pool, old)

    def _fork(self, row: _Row) -> _Row:
        return _Row(list(row.blocks), row.length, row.pad)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._replace_rows([self._fork(self.rows[i]) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace_rows([self._fork(row) for row in self.rows for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_rows([self._fork(self.rows[i]) for i in indices.tolist()])

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)`` drops the last n tokens; ``crop(n)`` with n >= 0 keeps n (the legacy absolute form)."""
        current = self.written[0]
        keep = current + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, current)
        keep = max(keep, 0)
        bs = self.pool.block_size
        for row in self.rows:
            real = max(keep - row.pad, 0)
            n_blocks = -(-real // bs)
            dropped = row.blocks[n_blocks:]
            del row.blocks[n_blocks:]
            if dropped:
                self.pool.free(dropped)
            row.length = real
            if real % bs and row.blocks:
                # The kept partial block will be written again: it no longer holds the prefix it was published for.
                self.pool.unpublish(row.blocks[-1])
                if self.pool.refcount(row.blocks[-1]) == 1:
                    self.pool.truncate_fill(row.blocks[-1], real % bs)
        self.written = [keep] * self.num_layers
