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
- Chunked prefill (Transformers' ``prefill_chunk_size``): a chunk after the first takes its blocks in one go, its
  full blocks hashed on the chain its row's earlier blocks began (so prefix sharing covers every full block of a
  prompt whose chunks are whole blocks), written straight into the pool. With ``history_in_place=True``, when the
  pool's model (``KVCachePool.for_model``) runs the ``hf_vram`` or ``hf_vram_paged`` attention, the chunk's
  attention reads the history from the pool a segment at a time (``history_attention``) instead of a gathered
  copy of all of it; any other attention gets the copy.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from hf_vram.kernels.history_attention import ATTENTIONS, HistoryStep, clear_history, set_history
from hf_vram.kvcache.paged_attention import PagedStep, clear_step, set_step
from hf_vram.kvcache.pool import NULL_BLOCK, KVCachePool


@dataclass
class _Row:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # real tokens stored
    pad: int = 0  # left-pad positions in the attention layout, never stored
    parent: bytes | None = b""  # the hash chain after the row's full blocks; None once a block was not hashed


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


@dataclass
class _StepPlan:
    """One forward's bookkeeping, made at layer 0: which of the step's tokens go to which slots, which blocks to
    publish once every layer wrote them, and what to undo if the step cannot get all its blocks."""

    write_src: list[int] = field(default_factory=list)  # positions on the flattened (batch, token) axis
    write_slots: list[int] = field(default_factory=list)
    publish: list[tuple[int, int]] = field(default_factory=list)  # (content hash, block)
    pending: dict[int, int] = field(default_factory=dict)  # hashes this step stores, for later rows of it
    taken: list[int] = field(default_factory=list)  # references this step took
    copied: list[int] = field(default_factory=list)  # originals whose reference a copy-on-write gave up
    fills: list[tuple[int, int]] = field(default_factory=list)  # (block, fill before) of partial blocks written

    def write(self, row: int, q_len: int, lo: int, hi: int, first_slot: int) -> None:
        self.write_src.extend(range(row * q_len + lo, row * q_len + hi))
        self.write_slots.extend(range(first_slot, first_slot + hi - lo))

    def undo(self, pool: KVCachePool) -> None:
        if self.copied:
            pool.incref(self.copied)
        for block, fill in self.fills:
            pool.truncate_fill(block, fill)
        if self.taken:
            pool.free(self.taken)


class PooledKVCache(Cache):
    """A cache over a shared block pool; see the module docstring. ``pad_lengths`` overrides pad detection."""

    def __init__(
        self,
        pool: KVCachePool,
        pad_lengths: list[int] | None = None,
        paged_attention: bool = False,
        history_in_place: bool = False,
    ) -> None:
        super().__init__(layers=[])
        self.pool = pool
        self.paged_attention = paged_attention
        self.history_in_place = history_in_place
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
        if self.history_in_place:
            clear_history()
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
        if self.history_in_place:
            set_history(None)  # the previous layer's attention must have taken its history
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
        if step["in_place"] and q_len > 1 and not self.pool.sliding[layer_idx]:
            slots = step["gather_slots"].view(batch, past + q_len)[:, :past]
            set_history(HistoryStep(layer_idx, self.pool, slots))  # the attention reads the pool itself
            return key_states, value_states
        if self.paged_attention:
            paged = self._paged_step(layer_idx) if q_len == 1 and not self.pool.sliding[layer_idx] else None
            set_step(paged)  # None: blocks in host memory (offload) or a chunk; the attention gets the gathered K/V
            if paged is not None:  # the hf_vram_paged attention reads the pool through the block tables
                return key_states, value_states
        return self.pool.gather(layer_idx, step["gather_slots"].view(batch, past + q_len), key_states.dtype)

    def _attention_reads_pool(self) -> bool:
        """Whether the pool's model runs an attention that takes a ``HistoryStep`` (any other gets the gathered
        history: a chunk never attends to itself alone)."""
        config = self.pool.model_config
        return getattr(config, "_attn_implementation", None) in ATTENTIONS

    def _paged_step(self, layer: int) -> PagedStep | None:
        """The block tables (in device places) for the paged decode attention; None when a block is in host memory."""
        step = self._step
        if "tables" not in step:
            width = max(len(r.blocks) for r in self.rows)
            tables = torch.zeros(len(self.rows), width, dtype=torch.int32)
            for i, r in enumerate(self.rows):
                tables[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
            step["tables"] = self.pool.device_tables(tables.to(self.pool.device))
            step["lens"] = torch.tensor([r.length for r in self.rows], dtype=torch.int32, device=self.pool.device)
        if step["tables"] is None:
            return None
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
        plan = _StepPlan()
        saved = [(list(row.blocks), row.length, row.parent) for row in self.rows]
        try:
            if prefill:
                for r, row in enumerate(new_rows):
                    self._extend_row(r, row, k, v, q_len, plan, start=row.pad)
                self.rows.extend(new_rows)
            else:
                for r, row in enumerate(self.rows):
                    self._extend_row(r, row, k, v, q_len, plan)
        except BaseException:  # all or nothing: the rows and the pool as they were
            plan.undo(self.pool)
            if prefill:
                self.rows.clear()
            else:
                for row, (blocks, length, parent) in zip(self.rows, saved, strict=True):
                    row.blocks, row.length, row.parent = blocks, length, parent
            raise
        gather = None
        if not prefill:
            gather = torch.cat([self._row_slots(row) for row in self.rows])
        device = self.pool.device
        self._step = {
            "write_src": torch.tensor(plan.write_src, dtype=torch.long, device=k.device),
            "write_slots": torch.tensor(plan.write_slots, dtype=torch.long, device=device),
            "gather_slots": gather,
            "publish": plan.publish,
            "in_place": self.history_in_place and self._attention_reads_pool(),
        }

    def _extend_row(self, r: int, row: _Row, k, v, q_len: int, plan: _StepPlan, start: int = 0) -> None:
        """Store row ``r``'s tokens ``start:q_len`` of this step after what the row holds (a prompt, a prefill chunk,
        a decode step): its partial last block filled first (copied if shared), then whole blocks, each hashed on
        the row's chain (over layer 0's K/V) and shared with or published for other requests, then a partial tail.
        A block not hashed whole ends the chain: the row's later blocks stay private."""
        bs, pool = self.pool.block_size, self.pool
        t = start
        if row.length % bs:
            index, fill = row.length // bs, row.length % bs
            if pool.refcount(row.blocks[index]) > 1:  # shared: copy before writing
                old = row.blocks[index]
                row.blocks[index] = pool.copy_on_write(old)
                plan.copied.append(old)
                plan.taken.append(row.blocks[index])
            else:
                plan.fills.append((row.blocks[index], fill))
            t = min(start + bs - fill, q_len)
            pool.note_fill(row.blocks[index], fill + t - start)
            plan.write(r, q_len, start, t, row.blocks[index] * bs + fill)
            row.parent = None
        while t < q_len:
            lo, hi = t, min(t + bs, q_len)
            t, content_hash = hi, None
            if hi - lo == bs and row.parent is not None:
                digest = hashlib.blake2b(row.parent, digest_size=16)
                digest.update(_raw_bytes(k[r, :, lo:hi]))
                digest.update(_raw_bytes(v[r, :, lo:hi]))
                row.parent = digest.digest()
                content_hash = int.from_bytes(row.parent, "little")
                block = pool.lookup(content_hash)
                if block is None and content_hash in plan.pending:  # an earlier row of this step stores it
                    block = plan.pending[content_hash]
                    pool.incref([block])
                if block is not None:
                    plan.taken.append(block)
                    row.blocks.append(block)
                    continue
            else:
                row.parent = None
            (block,) = pool.allocate(1)
            plan.taken.append(block)
            row.blocks.append(block)
            pool.note_fill(block, hi - lo)
            plan.write(r, q_len, lo, hi, block * bs)
            if content_hash is not None:
                plan.pending[content_hash] = block
                plan.publish.append((content_hash, block))
        row.length += q_len - start

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
        return _Row(list(row.blocks), row.length, row.pad, row.parent)

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
            row.parent = None  # a cut row's later blocks are not hashed
            if real % bs and row.blocks:
                # The kept partial block will be written again: it no longer holds the prefix it was published for.
                self.pool.unpublish(row.blocks[-1])
                if self.pool.refcount(row.blocks[-1]) == 1:
                    self.pool.truncate_fill(row.blocks[-1], real % bs)
        self.written = [keep] * self.num_layers
