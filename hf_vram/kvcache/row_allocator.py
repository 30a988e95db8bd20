"""Quantized K/V pages inside Transformers' continuous batching: the row layout both hf_vram allocators share.

Transformers' ``FullAttentionCacheAllocator`` lays a group of layers out in one flat byte tensor: a block holds one
page per layer, a page ``page_size`` key rows then ``page_size`` value rows, and a token's row is found by a
physical index that the allocator hands to the model's attention (write indices for the new tokens, read indices
for everything the attention reads). ``RowAllocator`` keeps that geometry and indexing and only changes what a row
holds: ``row_bytes`` bytes of a codec instead of model-dtype values, so block sharing, prefix hashing, forks (byte
copies of whole blocks) and CPU offloading move them unchanged. Subclasses say how long a row is
(``row_bytes_for``), what ``write_rows`` writes and what ``read_rows`` reads: ``QuantizedFullAttentionAllocator`` (int8, per token) and
``WindowedFullAttentionAllocator`` (int4/int2, KIVI-style).

Not supported: the block-table decode fast path (flash-attention kernels read model-dtype pages), so these
allocators report ``supports_block_table = False`` and the batch uses the index path; sliding-window layers keep
Transformers' own allocator.
"""

from __future__ import annotations

import torch
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.continuous_batching.cache_allocators import CachePool, FullAttentionCacheAllocator
from transformers.generation.continuous_batching.utils import find_head_dim

from hf_vram.kvcache.paged_decodes import DecodePlan, KiviReads, PagedDecodes, decode_plan, fresh_states, read_others


class RowAllocator(FullAttentionCacheAllocator):
    """``FullAttentionCacheAllocator`` whose rows are ``row_bytes`` codec bytes; ``bits`` is set per subclass."""

    supports_block_table = False
    bits: int = 8

    def __init__(
        self,
        index: int,
        config: PreTrainedConfig,
        num_key_value_heads: int,
        cache_dtype: torch.dtype,
        page_size: int,
        layer_indices: list[int],
        allow_block_sharing: bool,
    ) -> None:
        self.model_config = config
        self.head_dim = find_head_dim(config)
        self.num_key_value_heads = num_key_value_heads
        self.cache_dtype = cache_dtype  # what reads return: the model's dtype
        self._written_reads: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's, ``as_computed``
        self._plan: DecodePlan | None = None  # this step's decodes, ``update_deferring_decodes``
        self.row_bytes = self.row_bytes_for(num_key_value_heads, self.head_dim)
        self.page_of, pages = self.pages_of(layer_indices)
        self._before_cache_tensor_init(
            index=index,
            layer_indices=layer_indices,
            tokens_per_page=page_size,
            bytes_per_page=self.rows_per_token * page_size * self.row_bytes,
            allow_block_sharing=allow_block_sharing,
        )
        if pages != self.pages_per_block:  # layers of more than one page each: a block holds their pages too
            self.pages_per_block = pages
            self.tokens_per_block = page_size * pages
            self.block_physical_stride = self.rows_per_token * self.tokens_per_block
            self.bytes_per_block = self.bytes_per_page * pages

    def pages_of(self, layer_indices: list[int]) -> tuple[dict[int, int], int]:
        """Each layer's first page in a block, and the pages a block holds: one per layer here."""
        return {layer: i for i, layer in enumerate(layer_indices)}, len(layer_indices)

    @classmethod
    def row_bytes_for(cls, num_key_value_heads: int, head_dim: int) -> int:
        """Bytes of one token's keys (or values) for one layer."""
        raise NotImplementedError

    @classmethod
    def bytes_per_token(cls, config: PreTrainedConfig, num_key_value_heads: int) -> int:
        """K and V bytes of one token in one layer (what a page of ``page_size`` tokens holds per token)."""
        return cls.rows_per_token * cls.row_bytes_for(num_key_value_heads, find_head_dim(config))

    def register_cache_tensor(
        self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor: torch.Tensor, pool: CachePool
    ) -> None:
        """The same layout as the float allocator's (see its docstring), in rows of ``row_bytes`` bytes; each layer's
        key and value rows as views (``_row_views``) that physical indices address directly."""
        self.bytes_per_sector = bytes_per_sector
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)
        total_bytes = non_trash_bytes + 2 * bytes_per_sector
        total_tokens = (total_bytes // self.bytes_per_page) * self.tokens_per_page
        self._rows = cache_tensor[: total_tokens * self.rows_per_token * self.row_bytes].view(-1, self.row_bytes)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, self._rows, pool)
        page, at = self.tokens_per_page, self.page_of
        self._row_views = {layer: (self._rows[2 * at[layer] * page :], self._rows[(2 * at[layer] + 1) * page :]) for layer in at}
        self._first_rows = {layer: 2 * at[layer] * page for layer in at}

    def row_byte_offsets(self, layer_idx: int, kv: int, rows: torch.Tensor) -> torch.Tensor:
        """Where in ``_rows``' bytes the key (kv 0) or value (kv 1) rows ``rows`` of ``layer_idx`` start (what a
        kernel writing by address needs)."""
        return (rows + self._first_rows[layer_idx] + kv * self.tokens_per_page) * self.row_bytes

    def update(
        self,
        key_states: torch.Tensor,  # [seqlen_q, num_kv_heads, head_dim]
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,  # [past_length + seqlen_q]
        write_index: torch.Tensor,  # [seqlen_q]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens (``write_rows``), then read the rows the attention needs (``read_rows``). A batch with
        no cache reads (prefills only) attends to the new states as computed, like the float allocator; in other
        batches the new tokens are read as computed too (``as_computed``). Values are stored (and so returned) as
        ``values_to_store`` makes them."""
        return self._update(key_states, self.values_to_store(value_states), layer_idx, read_index, write_index)

    def values_to_store(self, value_states: torch.Tensor) -> torch.Tensor:
        """The new values as the rows keep them, once per update (int4/int2 pages turn them: ``value_rotation``)."""
        return value_states

    def _update(self, key_states, value_states, layer_idx, read_index, write_index) -> tuple[torch.Tensor, torch.Tensor]:
        self.write_rows(key_states, value_states, layer_idx, write_index)
        if read_index.numel() == 0:
            return key_states, value_states
        read = self.read_rows(layer_idx, read_index, key_states.dtype)
        return self.as_computed(layer_idx, read, (key_states, value_states), read_index, write_index)

    def update_deferring_decodes(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        read_index: torch.Tensor,
        write_index: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, PagedDecodes | None]:
        """``update`` for an attention that runs the decodes from the pages (``hf_vram.kvcache.paged_decodes``):
        the same writes, the other sequences read as ``update`` reads them, the decodes' slots left unfilled, and
        what the kernel needs for them (None when the step has none: then exactly ``update``)."""
        if layer_idx == self.layer_indices[0]:  # every layer of a step reads and writes the same rows
            self._plan = decode_plan(cu_seqlens_q, cu_seqlens_k, read_index)
        plan = self._plan
        value_states = self.values_to_store(value_states)
        if plan is None:
            return (*self._update(key_states, value_states, layer_idx, read_index, write_index), None)
        self.write_rows(key_states, value_states, layer_idx, write_index)
        states = (key_states, value_states)
        read = read_others(plan, states, lambda rows: self.read_rows(layer_idx, rows, key_states.dtype))
        keys, values = self.as_computed(layer_idx, read, states, read_index, write_index)
        layer_plan, key_rows, value_rows, extras = self.decode_rows(layer_idx, plan)
        return keys, values, PagedDecodes(layer_plan, key_rows, value_rows, *fresh_states(plan, *states), extras)

    def write_rows(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, write_index: torch.Tensor) -> None:
        """Quantize and write the step's new tokens of one layer."""
        raise NotImplementedError

    def read_rows(self, layer_idx: int, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of page rows ``rows`` of one layer, dequantized to ``dtype``."""
        raise NotImplementedError

    def decode_rows(self, layer_idx: int, plan: DecodePlan) -> tuple[DecodePlan, torch.Tensor, torch.Tensor, KiviReads | None]:
        """What the decode kernel reads for one layer: the plan (its read index addressing the rows), the key and value
        rows, and ``decode_extras``."""
        return (plan, *self._row_views[layer_idx], self.decode_extras(layer_idx, plan))

    def decode_extras(self, layer_idx: int, plan: DecodePlan) -> KiviReads | None:
        """What the decode kernel needs beyond the rows (int4/int2 pages: positions and windows); None for int8."""
        return None

    def as_computed(
        self,
        layer_idx: int,
        read: tuple[torch.Tensor, torch.Tensor],
        fresh: tuple[torch.Tensor, torch.Tensor],
        read_index: torch.Tensor,
        write_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``read`` (dequantized rows of ``read_index``) with the rows this step wrote replaced
        by the ``fresh`` states as computed: a prefill chunk attends to its own tokens exactly, as it does when the
        batch holds prefills only (Transformers then passes no read index at all), so a request's answer does not
        depend on what it was batched with; only the past is read quantized. Which read rows were written is found
        once a step, by the allocator's first layer (every layer reads and writes the same rows)."""
        if layer_idx == self.layer_indices[0] or self._written_reads is None:
            self._written_reads = _written_reads(read_index, write_index)
        at, source = self._written_reads
        if at.numel():
            for out, states in zip(read, fresh, strict=True):
                out[at] = states[source].to(out.dtype)
        return read

    def get_cache_for_block_table(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(
            f"hf_vram: int{self.bits} KV pages have no block-table decode path (flash kernels read model-dtype pages); "
            "the batch must use the index path (supports_block_table is False)."
        )


def _written_reads(read_index: torch.Tensor, write_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(at, source)``: the places in ``read_index`` of rows that ``write_index`` writes, and where in the written
    states each comes from."""
    if write_index.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=read_index.device)
        return empty, empty
    order = torch.argsort(write_index)
    written = write_index[order]
    at = torch.searchsorted(written, read_index).clamp_(max=written.numel() - 1)
    hit = (written[at] == read_index).nonzero().squeeze(1)
    return hit, order[at[hit]]
