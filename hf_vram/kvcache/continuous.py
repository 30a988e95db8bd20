"""hf_vram models inside Transformers' continuous batching (``model.generate_batch``, ``init_continuous_batching``).

Two seams, both wrapped rather than forked:

- ``HfVramPagedAttentionCache`` takes the place of Transformers' ``PagedAttentionCache`` in the continuous-batching
  module (``hf_vram.hf.registration`` installs it when that module loads). For a model whose hf_vram config asks
  for quantized K/V (``kv_cache.dtype``: ``int8``, ``int4`` or ``int2``) its full-attention layers get a
  ``QuantizedFullAttentionAllocator``; ``kv_cache.max_memory`` becomes the cache's budget when the batching config
  sets none. Every other model gets exactly Transformers' cache. Upstream would need one hook for this: an
  allocator (or cache) class in ``ContinuousBatchingConfig``.
- ``install_continuous_batching_guard`` (the pipeline's serving stage, on every hf_vram model) checks, before any
  request runs, what the paged cache cannot hold, and refuses it with the fix: per-layer KV-head counts (pruning
  with different ratios per layer), whose K/V rows the cache sizes from one config-wide count. While the manager
  lives, a model with quantized K/V pages or hf_vram's fused attention attends with ``hf_vram_varlen``
  (``hf_vram.kvcache.batching_attention``: per sequence, no block-diagonal mask; continuous batching itself admits
  only SDPA, eager and flash names, so the switch happens after the manager is built), and its own attention comes
  back when the manager stops.
- ``kv_cache.step_prefill_tokens``: the cache names hf_vram's scheduler (``step_budget.PrefillCappedScheduler``,
  registered in Transformers' scheduler table) in the batching config before the manager picks one, so a step
  carries at most that many prompt tokens beside decoding requests.
- ``HfVramPagedAttentionCache.update``: with quantized pages, that attention and hf_vram's CPU kernel loaded, a
  step's decodes are not read into float K/V at all: the allocator hands their rows to the attention through the
  layer's kwargs, which the kernel attends from (``hf_vram.kvcache.paged_decodes``).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref

import torch
import torch.nn as nn
from transformers.generation.continuous_batching import cache as cb_cache
from transformers.generation.continuous_batching import scheduler as cb_scheduler
from transformers.generation.continuous_batching.cache_allocators import FULL_ATTENTION, FullAttentionCacheAllocator
from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

from hf_vram.config import kv_cache_section
from hf_vram.kernels import paged_decode
from hf_vram.kvcache import paged_decodes
from hf_vram.kvcache.batching_attention import NAME as VARLEN_ATTENTION
from hf_vram.kvcache.batching_attention import unsupported_reason
from hf_vram.kvcache.group_window import slot_size, window_row_bytes
from hf_vram.kvcache.kivi import GROUP as WINDOW_GROUP
from hf_vram.kvcache.kivi import WINDOWED_BITS, window_policy
from hf_vram.kvcache.layer_widths import slot_count, widened_count
from hf_vram.kvcache.paged_allocator import quantized_allocator
from hf_vram.kvcache.paged_decodes import PAGED_DECODES
from hf_vram.kvcache.pool import observe_kv_shapes
from hf_vram.kvcache.step_budget import NAME as PREFILL_CAPPED
from hf_vram.kvcache.step_budget import PrefillCappedScheduler
from hf_vram.kvcache.value_rotation import VALUE_ROTATION, rotate

KV_BITS = {"int8": 8, "int4": 4, "int2": 2}
HF_VRAM_ATTENTION = ("hf_vram", "hf_vram_paged")
_swap_lock = threading.Lock()
_LIVE_CACHES: weakref.WeakSet = weakref.WeakSet()  # every HfVramPagedAttentionCache alive, for pool_blocks()


def kv_token_capacity(config, max_memory: int, kv_dtype: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Tokens of K/V (every layer) that ``max_memory`` bytes hold in continuous batching's pages: ``kv_dtype`` int8 /
    int4 / int2 in hf_vram's page rows, anything else in ``dtype``. What a server admits requests against."""
    heads, head_dim = find_num_key_value_heads(config), find_head_dim(config)
    bits = KV_BITS.get(kv_dtype)
    per_layer = (
        quantized_allocator(bits).bytes_per_token(config, heads)
        if bits
        else FullAttentionCacheAllocator.get_bytes_per_page(heads, head_dim, dtype, 1)
    )
    return max_memory // ((slot_count(config, bits) if bits else config.num_hidden_layers) * per_layer)


# Transformers 5.24 reads ``num_blocks`` as blocks of model-dtype K/V (a byte budget whatever the allocators' rows);
# 5.25 (which builds allocators through ``_create_allocator``) as blocks of the allocators' own bytes.
NUM_BLOCKS_IN_ALLOCATOR_BYTES = hasattr(cb_cache.PagedAttentionCache, "_create_allocator")


def budget_blocks(config, max_memory: int, kv_bits: int | None, dtype: torch.dtype, page_size: int) -> int:
    """``num_blocks`` for a K/V budget of ``max_memory`` bytes, in which quantized pages hold 2x (int8) to 6x
    (int2) the tokens of model-dtype ones: under Transformers 5.24 the model-dtype blocks it holds (turned back into
    those bytes), under 5.25 the quantized allocator's own blocks."""
    in_own_blocks = kv_bits is not None and NUM_BLOCKS_IN_ALLOCATOR_BYTES
    kv_dtype = f"int{kv_bits}" if in_own_blocks else "auto"
    return max(1, kv_token_capacity(config, max_memory, kv_dtype, dtype) // page_size)


def window_tokens(config, kv_dtype: str, page_size: int) -> int:
    """Tokens of pages one running request's int4/int2 window takes from the budget besides its own pages (0 for
    other formats): what admission adds to each request's tokens."""
    bits = KV_BITS.get(kv_dtype)
    if bits not in WINDOWED_BITS:
        return 0
    heads, head_dim = find_num_key_value_heads(config), find_head_dim(config)
    token_bytes = quantized_allocator(bits).bytes_per_token(config, heads)  # K and V of one token, one layer
    places = window_policy(bits, kv_cache_section(config)).window_groups  # the sink, recent and unfinished groups
    layers = config.num_hidden_layers
    _, blocks = slot_size(  # as the allocator's window sizes its slot (borrowing where a page is one key group)
        layers, places, WINDOW_GROUP, window_row_bytes(heads, head_dim), slot_count(config, bits) * page_size * token_bytes,
        page_size == WINDOW_GROUP and not widened_count(kv_cache_section(config)),
    )  # fmt: skip
    return blocks * page_size


class HfVramPagedAttentionCache(cb_cache.PagedAttentionCache):
    """Transformers' paged cache, with quantized full-attention pages when the model's hf_vram config asks for them."""

    def __init__(
        self,
        config,
        continuous_batching_config,
        device,
        distributed_helper,
        dtype: torch.dtype = torch.float16,
        model_supports_logits_to_keep: bool = False,
    ) -> None:
        section = kv_cache_section(config)
        self.kv_bits = KV_BITS.get(section.dtype) if section is not None else None
        cb_config = continuous_batching_config
        if section is not None and section.max_memory and cb_config.num_blocks is None:
            cb_config.num_blocks = budget_blocks(config, section.max_memory, self.kv_bits, dtype, cb_config.page_size)
        self.step_prefill_tokens = section.step_prefill_tokens if section is not None else None
        if self.step_prefill_tokens is not None and cb_config.scheduler_type == "fifo":
            cb_config.scheduler_type = PREFILL_CAPPED  # the manager picks its scheduler after building this cache
        elif self.step_prefill_tokens is None and cb_config.scheduler_type == PREFILL_CAPPED:
            cb_config.scheduler_type = "fifo"  # a config reused from a capped model's run: this model sets no cap
        args = (config, cb_config, device, distributed_helper, dtype, model_supports_logits_to_keep)
        if self.kv_bits is None:
            super().__init__(*args)
        else:
            paged_decode.kernel_available()  # built (first time on this machine) before any request, not during one
            with _swap_lock:  # the allocator table is Transformers' module state: swapped only while this is built
                original = cb_cache.ATTN_TYPE_TO_ALLOCATOR[FULL_ATTENTION]
                cb_cache.ATTN_TYPE_TO_ALLOCATOR[FULL_ATTENTION] = quantized_allocator(self.kv_bits)
                try:
                    super().__init__(*args)
                finally:
                    cb_cache.ATTN_TYPE_TO_ALLOCATOR[FULL_ATTENTION] = original
        # counted by pool_blocks() only once built: a server's publishing thread reading a cache still being built
        # found no allocators (AttributeError) and died, leaving /metrics at its last numbers for good
        _LIVE_CACHES.add(self)

    @torch.compiler.disable  # as Transformers' own: the views of the cache tensor do not trace
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict):
        """Transformers' index-path update, except that quantized pages hand their decodes to the attention unread
        (``hf_vram.kvcache.paged_decodes``) when it is ``hf_vram_varlen`` and a kernel reads them there (hf_vram's
        CPU kernel, or its Triton twin on CUDA: ``decode_kernel``), and
        that values int4/int2 pages return turned (``value_rotation``) are turned back: by that attention's output,
        else here."""
        allocator = self.layer_to_allocator[layer_idx]
        keys, values = self._update(allocator, key_states, value_states, layer_idx, kwargs)
        rotation = getattr(allocator, "value_rotation", None)
        if rotation is None:
            kwargs.pop(VALUE_ROTATION, None)  # never another layer's, should the kwargs be shared
            return keys, values
        if self._attends_with_varlen():
            kwargs[VALUE_ROTATION] = rotation  # the attention turns its output back, once per query row
            return keys, values
        return keys, rotate(values, rotation)  # another attention: the values themselves turned back

    def _attends_with_varlen(self) -> bool:
        """Whether the model attends with ``hf_vram_varlen``, the one attention that takes what the cache hands over
        in the kwargs (decodes left in the pages, values to turn back)."""
        return getattr(self.config, "_attn_implementation", None) == VARLEN_ATTENTION

    def _update(self, allocator, key_states, value_states, layer_idx: int, kwargs: dict):
        deferring = getattr(allocator, "update_deferring_decodes", None)
        if (
            deferring is None
            or kwargs.get("block_table") is not None
            or not self._attends_with_varlen()
            or paged_decodes.decode_kernel(key_states.device) is None
        ):
            return super().update(key_states, value_states, layer_idx, kwargs)
        kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        read_index, write_index = kwargs["read_index"][allocator.index], kwargs["write_index"][allocator.index]
        states = (x.squeeze(0).transpose(0, 1) for x in (key_states, value_states))
        keys, values, decodes = deferring(
            *states, layer_idx, read_index, write_index, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        )
        if decodes is not None:
            kwargs[PAGED_DECODES] = decodes
        return keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the cache tensor (trash sectors included; int4/int2 windows live in its blocks): the KV memory
        the batch holds."""
        return self.cache_tensor.numel() * self.cache_tensor.element_size()

    def blocks_held_and_free(self) -> tuple[int, int]:
        """Blocks that running requests hold (their pages, shared ones once, and their int4/int2 windows), and
        blocks free: in the allocators' sectors and, in blocks of the first allocator, the sectors none has taken
        yet (exact for the one-allocator models of full attention). Blocks only the prefix cache keeps count as
        neither."""
        held, free = 0, 0
        for allocator in self.cache_allocators.values():
            blocks = {b for table in list(allocator.block_table.values()) for b in table}
            window = getattr(allocator, "window", None)
            held += len(blocks) + (window.held_blocks() if window is not None else 0)
            free += self.pool.count_free_blocks(allocator.index)
        return held, free + self.pool.num_free_sectors * self.pool.blocks_per_sector[0]


def pool_blocks() -> tuple[int, int]:
    """``(held, free)`` blocks summed over every continuous-batching cache alive in this process (what a server's
    ``/metrics`` reports: held must come back to 0 when no request runs)."""
    held, free = 0, 0
    for cache in list(_LIVE_CACHES):
        h, f = cache.blocks_held_and_free()
        held, free = held + h, free + f
    return held, free


def _unblocking_clear_cancelled_requests(clear_cancelled_requests):
    """Transformers 5.24's scheduler stops taking waiting requests after it offloads (``block_new_requests``) and
    takes them again only when a request *finishes*. When the requests still running are cancelled instead, nothing
    ever finishes: the flag stays set with no active request, the waiting requests never run, and ``stop()`` (which
    flushes them) waits forever. Seen here: a tight cache (6 blocks), 12 requests, 5 random cancellations a round,
    two processes at once: one stalled in its round 2, the other in its round 19. A cancellation frees its blocks as a finish does, so it lifts the flag the same way; and
    with nothing active the flag can only stall. Upstream: the same two lines in ``clear_cancelled_requests``."""

    @functools.wraps(clear_cancelled_requests)
    def clear(self):
        cancelled = clear_cancelled_requests(self)
        if cancelled or not self.active_requests:
            self.block_new_requests = False
        return cancelled

    clear._hf_vram_unblocking = True
    return clear


def install(continuous_api_module) -> None:
    """Put ``HfVramPagedAttentionCache`` where the manager builds its cache, the scheduler fix above and the
    prefill-capped scheduler (``step_budget``) in place (idempotent)."""
    continuous_api_module.PagedAttentionCache = HfVramPagedAttentionCache
    cb_scheduler.SCHEDULER_MAPPING[PREFILL_CAPPED] = PrefillCappedScheduler
    scheduler = cb_scheduler.Scheduler
    if not getattr(scheduler.clear_cancelled_requests, "_hf_vram_unblocking", False):
        scheduler.clear_cancelled_requests = _unblocking_clear_cancelled_requests(scheduler.clear_cancelled_requests)


def check_kv_heads(model: nn.Module) -> None:
    """Refuse, before any request runs, a model whose layers keep different KV-head counts or head sizes."""
    shapes, _, _ = observe_kv_shapes(model)
    if len(set(shapes)) > 1:
        counts = sorted({(s.num_kv_heads, s.head_dim) for s in shapes})
        raise ValueError(
            f"hf_vram: this model's layers keep different KV heads (heads, head_dim) {counts} (pruned per layer), and "
            "continuous batching's paged cache sizes every layer's K/V rows from one config-wide head count, so its "
            "requests would fail. Prune with one head_ratio for every layer (or head_ratio 0: MLP pruning is fine), "
            "or serve this model with model.generate over hf_vram's pool (kv_cache.enabled), which holds per-layer "
            "head counts."
        )


class RequestFailedError(RuntimeError):
    """``generate_batch`` finished with failed requests; ``results`` holds every output, the failed ones included."""

    def __init__(self, message: str, results: dict) -> None:
        super().__init__(message)
        self.results = results


def check_prompt(input_ids) -> None:
    """Refuse an empty prompt: continuous batching would generate for it from nothing, silently."""
    if len(input_ids) == 0:
        raise ValueError(
            "hf_vram: a request with an empty prompt has nothing to continue from, and continuous batching would "
            "generate for it anyway; give every request at least one token (e.g. the tokenizer's BOS token id). "
            "Nothing was added."
        )


def _checked_add_request(add_request):
    @functools.wraps(add_request)
    def checked(input_ids, *args, **kwargs):
        check_prompt(input_ids)
        return add_request(input_ids, *args, **kwargs)

    return checked


def _restoring_destroy(manager):
    """``destroy`` that also gives the model its attention back when the manager never started (Transformers restores
    it only in ``stop``, which a manager that never ran skips)."""
    destroy = type(manager).destroy.__get__(manager)

    @functools.wraps(destroy)
    def restoring() -> None:
        destroy()
        if manager._original_attn_impl is not None and not manager.is_running():
            manager.model.set_attn_implementation(manager._original_attn_impl)
            manager._original_attn_impl = None

    return restoring


def _runs_varlen(model: nn.Module, attention: str) -> bool:
    """Whether continuous batching runs ``model`` with the ``hf_vram_varlen`` attention: when hf_vram reads its
    K/V (quantized pages) or the user chose hf_vram's attention (``fusion.attention``), and the model's attention
    has nothing that one lacks (``batching_attention.unsupported_reason``). A model with SDPA and model-dtype K/V keeps
    Transformers' own path."""
    section = kv_cache_section(model.config)
    quantized = section is not None and section.dtype in KV_BITS
    return (quantized or attention in HF_VRAM_ATTENTION) and unsupported_reason(model) is None


def install_continuous_batching_guard(model: nn.Module) -> None:
    """Wrap ``model.init_continuous_batching`` (which ``generate_batch`` and the context manager call) with the
    checks and the attention switch described in the module docstring; a manager it returns refuses empty prompts,
    and ``generate_batch`` raises ``RequestFailedError`` for failed requests instead of only logging them."""
    original = getattr(model, "init_continuous_batching", None)
    if original is None or getattr(original, "_hf_vram_guarded", False):
        return

    @functools.wraps(original)
    def init_continuous_batching(*args, **kwargs):
        check_kv_heads(model)
        attention = model.config._attn_implementation
        if attention in HF_VRAM_ATTENTION + (VARLEN_ATTENTION,):
            model.set_attn_implementation("sdpa")  # continuous batching admits SDPA
        try:
            manager = original(*args, **kwargs)
        except BaseException:
            model.set_attn_implementation(attention)
            raise
        user_attention = "sdpa" if attention == VARLEN_ATTENTION else attention
        if model.config._attn_implementation == "sdpa" and _runs_varlen(model, user_attention):
            model.set_attn_implementation(VARLEN_ATTENTION)
        if model.config._attn_implementation != user_attention and manager._original_attn_impl is None:
            manager._original_attn_impl = user_attention  # the manager restores it when it stops
        manager.add_request = _checked_add_request(type(manager).add_request.__get__(manager))
        manager.destroy = _restoring_destroy(manager)
        return manager

    batch = model.generate_batch

    @functools.wraps(batch)
    def generate_batch(inputs, *args, **kwargs):
        for prompt in inputs:  # before the manager starts: nothing runs
            check_prompt(prompt)
        results = batch(inputs, *args, **kwargs)
        failed = {k: r.error for k, r in results.items() if r.error is not None}
        expected = len(inputs) * (getattr(kwargs.get("generation_config"), "num_return_sequences", None) or 1)
        if failed or len(results) < expected:
            first = next(iter(failed.items()), ("-", "missing from the results"))
            raise RequestFailedError(
                f"hf_vram: {len(failed) or expected - len(results)} of {expected} request(s) failed in continuous "
                f"batching (first: {first[0]}: {first[1]}); the outputs, failed ones included, are in .results.",
                results,
            )
        return results

    init_continuous_batching._hf_vram_guarded = True
    model.init_continuous_batching = init_continuous_batching
    model.generate_batch = generate_batch


# This module imports Transformers' continuous-batching package, whose loading runs hf_vram's registration hook,
# which installs from this module: when this module is imported first, the hook finds it half-built and leaves the
# install to this line.
_continuous_api = sys.modules.get("transformers.generation.continuous_batching.continuous_api")
if _continuous_api is not None:
    install(_continuous_api)
