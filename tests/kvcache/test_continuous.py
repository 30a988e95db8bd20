"""hf_vram models inside Transformers' continuous batching: every preset runs or is refused before a request runs,
and quantized K/V pages hold more tokens in the same bytes while computing what their codec says."""

from __future__ import annotations

import math
from dataclasses import replace
from math import lcm
from unittest.mock import patch

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import cache as cb_cache
from transformers.generation.continuous_batching.cache_allocators import CachePool
from transformers.generation.continuous_batching.offloading_manager import OffloadingManager

import hf_vram
from hf_vram.evaluation import windowed_round_trip
from hf_vram.kernels import cpu_extension, kivi_write, kv_write, paged_decode
from hf_vram.kvcache import continuous, paged_decodes
from hf_vram.kvcache.batching_attention import unsupported_reason
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.continuous import KV_BITS, NUM_BLOCKS_IN_ALLOCATOR_BYTES, HfVramPagedAttentionCache, RequestFailedError
from hf_vram.kvcache.kivi import WINDOWED_BITS, WindowPolicy, window_policy
from hf_vram.kvcache.paged_allocator import quantized_allocator
from hf_vram.kvcache.rope_frame import RopeFrame
from hf_vram.kvcache.value_rotation import rotate
from hf_vram.presets import available_presets
from tests.tiny_models import build_tiny

PROMPT_LENGTHS = (3, 9, 17, 30, 5, 12, 24, 7, 40, 2, 15, 33, 11, 20, 6, 28)  # 16 mixed prompts
NEW_TOKENS = 8
CALIBRATION = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _batched(model, prompts, **cb) -> list[list[int]]:
    config = ContinuousBatchingConfig(**{"num_blocks": 64, "page_size": 64, "max_batch_tokens": 128, **cb})
    out = model.generate_batch(prompts, generation_config=_generation(), continuous_batching_config=config)
    assert len(out) == len(prompts) and all(o.error is None for o in out.values()), [o.error for o in out.values()]
    return [o.generated_tokens for o in out.values()]


def _single(model, prompts, cache_factory=None) -> list[list[int]]:
    outs = []
    for p in prompts:
        kwargs = {"cache": cache_factory()} if cache_factory else {}
        ids = model.generate(torch.tensor([p]), generation_config=_generation(), **kwargs)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def _preset(name: str) -> hf_vram.VramOptimizationConfig:
    config = hf_vram.VramOptimizationConfig.from_preset(name)
    config.quantization.calibration_samples = 2
    config.pruning.calibration_samples, config.pruning.calibration_length = 2, 32
    return config


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_runs_under_continuous_batching_or_is_refused_first(name):
    """Float32, 16 mixed prompts in one batch: the same greedy tokens as single-request generate (quantized K/V
    pages: see the next tests), or a refusal naming the fix before any request runs."""
    model = hf_vram.optimize(build_tiny("llama").float().eval(), _preset(name), CALIBRATION)
    prompts = _prompts()
    heads = {m.k_proj.out_features for n, m in model.named_modules() if n.endswith("self_attn") and hasattr(m, "k_proj")}
    if len(heads) > 1:  # pruned to different KV-head counts per layer
        with pytest.raises(ValueError, match="different KV heads.*one head_ratio for every layer"):
            model.generate_batch(prompts, generation_config=_generation())
        return
    kv = model.config.quantization_config.kv_cache.dtype
    if kv in ("int8", "int4", "int2"):
        model.config.quantization_config.kv_cache.dtype = "auto"  # the float pages: exact against generate
    attention = model.config._attn_implementation
    assert _batched(model, prompts) == _single(model, prompts)
    assert model.config._attn_implementation == attention  # a fused model's own attention is back


def test_the_long_context_preset_widens_one_layer_turns_values_and_chunks_plain_generate():
    """``long-context``: int4 pages, values turned, one layer's K/V as int8 pages (a count, chosen when the model is
    optimized: a list of one layer after); a plain ``generate`` prefills in 2,048-token chunks; requests run over
    those pages with no error, a prompt long enough to have whole key groups included."""
    config = _preset("long-context")
    assert window_policy(4, config.kv_cache) == WindowPolicy(rotate_values=True)
    assert config.kv_cache.int8_layers == 1
    model = hf_vram.optimize(build_tiny("llama").float().eval(), config, CALIBRATION)
    assert model.generation_config.prefill_chunk_size == 2048
    section = model.config.quantization_config.kv_cache
    assert section.dtype == "int4" and len(section.int8_layers) == 1
    prompts = _prompts()[:4] + [[3 + i % 290 for i in range(200)]]  # 200 tokens: groups 0-2 whole
    tokens = _batched(model, prompts)
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(prompts)


def test_the_int2_long_context_preset_widens_one_layer_to_int4_and_keeps_two_lagging_groups():
    """``long-context-int2``: int2 pages, the first group and 2 lagging groups in the window, values turned, one
    layer's K/V as int4 pages (chosen when the model is optimized); requests run over those pages with no error."""
    config = _preset("long-context-int2")
    assert window_policy(2, config.kv_cache) == WindowPolicy(sink_groups=1, lag_groups=2, clip_keys=True, rotate_values=True)
    model = hf_vram.optimize(build_tiny("llama").float().eval(), config, CALIBRATION)
    assert model.generation_config.prefill_chunk_size == 2048
    section = model.config.quantization_config.kv_cache
    assert section.dtype == "int2" and len(section.int4_layers) == 1 and section.int8_layers is None
    prompts = _prompts()[:4] + [[3 + i % 290 for i in range(260)]]  # 260 tokens: groups 0-3 whole, one sealed
    tokens = _batched(model, prompts)
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(prompts)


class _QuantizedReadsLayer(DynamicLayer):
    """What a single request sees over quantized pages: each step attends to its own new tokens as computed, and to
    every earlier token as the pages return it: int8 through the per-token codec; int4/int2 with every whole group
    of 64 tokens the window does not keep quantized (keys per channel, values per token), the rest in int8
    (``windowed_round_trip``)."""

    def __init__(self, bits: int, frame: RopeFrame | None = None, policy=None) -> None:
        super().__init__()
        self.bits, self.frame, self.policy = bits, frame, policy  # policy: the window's, if not that of bits

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.bits in WINDOWED_BITS:
            read = windowed_round_trip(keys, values, self.bits, frame=self.frame, policy=self.policy)
        else:
            b, h, t, d = keys.shape
            codec = KVCodec(self.bits, h, d)
            read = [
                codec.round_trip(x.transpose(1, 2).reshape(b * t, h, d)).reshape(b, t, h, d).transpose(1, 2)
                for x in (keys, values)
            ]
        for out, fresh in zip(read, (key_states, value_states), strict=True):
            out[:, :, -new:] = fresh
        return tuple(read)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("per_batch", [1, 4])
def test_quantized_pages_compute_what_their_codec_says(tiny_dirs, bits, per_batch):
    """Continuous batching over int8/int4/int2 pages gives exactly the tokens of generate over a cache whose reads
    return what the pages hold: one request per batch (its prefill reads nothing back), and four at once (prefills
    beside decodes, key groups filled by decode steps and quantized straight from a prefill). 72 new tokens cross
    int4/int2 group boundaries in the window; a 330-token prompt gets int2's sink and lagging groups from its prefill,
    and its decode lets the oldest lagging group go."""
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"}, kv_cache={"dtype": f"int{bits}", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = _prompts()[:6] + [list(range(3, 143)), [3 + i % 300 for i in range(330)]]  # 140: two whole groups
    generation = _generation()
    generation.max_new_tokens = 72

    def cache():
        c = DynamicCache(config=model.config)
        frame = RopeFrame.for_config(model.config, model.config.head_dim)
        c.layers = [_QuantizedReadsLayer(bits, frame) for _ in c.layers]
        return c

    cb = ContinuousBatchingConfig(num_blocks=64, page_size=64, max_batch_tokens=128, max_requests_per_batch=per_batch)
    out = model.eval().generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert all(o.error is None for o in out.values())
    expected = [
        model.generate(torch.tensor([p]), generation_config=generation, cache=cache())[0, len(p) :].tolist() for p in prompts
    ]
    assert [o.generated_tokens for o in out.values()] == expected


@pytest.mark.parametrize("bits", [4, 2])
def test_turned_values_come_back_turned_whichever_attention_reads_them(tiny_dirs, monkeypatch, bits):
    """int4/int2 pages with ``kv_cache.rotate_values`` hold values turned (``value_rotation``); ``hf_vram_varlen``
    turns its output back, and where
    another attention reads the cache, the cache turns the values back itself: the same tokens and log-probabilities
    either way (and the turn is on: the allocators carry the matrix). One request a step, so the 200-token prompt's
    second chunk is a step with reads and no decode (turned once there too), the decodes steps of their own."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": f"int{bits}", "enabled": False, "rotate_values": True})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = _prompts()[:4] + [[3 + i % 300 for i in range(200)]]
    generation = _generation()
    generation.max_new_tokens = 40
    cb = ContinuousBatchingConfig(
        num_blocks=64, page_size=64, max_batch_tokens=128, max_requests_per_batch=1, return_logprobs=True
    )
    turned_back = []
    original = HfVramPagedAttentionCache.update

    def update(self, key_states, value_states, layer_idx, kwargs):
        out = original(self, key_states, value_states, layer_idx, kwargs)
        turned_back.append(self.layer_to_allocator[layer_idx].value_rotation is not None)
        return out

    monkeypatch.setattr(HfVramPagedAttentionCache, "update", update)
    by_attention = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert turned_back and all(turned_back)
    monkeypatch.setattr(HfVramPagedAttentionCache, "_attends_with_varlen", lambda self: False)
    by_cache = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert all(o.error is None for o in (*by_attention.values(), *by_cache.values()))
    assert [o.generated_tokens for o in by_cache.values()] == [o.generated_tokens for o in by_attention.values()]
    pairs = zip(by_cache.values(), by_attention.values(), strict=True)
    worst = max(abs(a - b) for c, v in pairs for a, b in zip(c.logprobs, v.logprobs, strict=True))
    assert worst < 1e-4, worst


@pytest.mark.parametrize(("bits", "step_tokens"), [(8, 64), (4, 64), (2, 64), (4, 256), (2, 256)])
def test_decodes_are_attended_from_the_pages_with_the_same_tokens(tiny_dirs, monkeypatch, bits, step_tokens):
    """With hf_vram's CPU kernel the decodes of each step are attended from the quantized rows (and, at int4/int2,
    the windows' int8 rows; their K/V never read into a float copy): every layer of every step with a decode calls
    it once, and the tokens are those of the torch path (kernel off), prompts long and short (groups filled by
    decodes, the window's sink and lagging groups at int2), several requests per step. The int8 rows (pages at 8
    bits, the window below) are written by hf_vram's row writer in the first run and by torch's ops in the second,
    and int4/int2 groups sealed by hf_vram's group sealer (``kivi_write``: groups filled in the window, and with 256
    tokens a step groups a prefill writes whole) in the first and by the codec in the second."""
    if not cpu_extension.compiler_present():
        pytest.skip("no C++ compiler here: the torch path is what runs (the next assertion would be vacuous)")
    assert paged_decode.kernel_available(), "hf_vram's CPU kernel failed to build with the compiler on PATH"
    kv = {"dtype": f"int{bits}", "enabled": False}
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"}, kv_cache=kv)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = _prompts()[:6] + [list(range(3, 143)), [3 + i % 300 for i in range(330)]]
    generation = _generation()
    generation.max_new_tokens = 40
    calls = []
    name = "paged_decode_int8" if bits == 8 else "paged_decode_kivi"
    kernel = getattr(paged_decodes, name)
    monkeypatch.setattr(paged_decodes, name, lambda *a, **k: calls.append(a[0].shape[0]) or kernel(*a, **k))
    writes = []
    writer = kv_write.quantize_rows_int8
    monkeypatch.setattr(kv_write, "quantize_rows_int8", lambda *a: writes.append(1) or writer(*a))
    seals, sealer = [], kivi_write.encode_from_int8
    monkeypatch.setattr(kivi_write, "encode_from_int8", lambda *a: seals.append(a[2].numel()) or sealer(*a))
    cb = ContinuousBatchingConfig(num_blocks=96, page_size=64, max_batch_tokens=step_tokens)
    with_kernel = model.eval().generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    layers = model.config.num_hidden_layers
    assert len(calls) >= 39 * layers and len(calls) % layers == 0 and max(calls) > 1  # decodes share each call
    assert writes
    assert (bits == 8) == (not seals)
    monkeypatch.setattr(paged_decode, "kernel_available", lambda: False)
    monkeypatch.setattr(kv_write, "kernel_available", lambda: False)
    monkeypatch.setattr(kivi_write, "kernel_available", lambda: False)
    calls.clear()
    writes.clear()
    seals.clear()
    torch_path = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert not calls and not writes and not seals
    assert [o.generated_tokens for o in with_kernel.values()] == [o.generated_tokens for o in torch_path.values()]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_on_cuda_the_triton_kernel_attends_the_decodes_with_the_same_tokens(tiny_dirs, monkeypatch, bits):
    """Where the pages are on CUDA the decodes go to the Triton twin of the CPU kernel (``triton_paged_rows``); run
    here under TRITON_INTERPRET=1 on the CPU tensors (the device check answering "triton"), every layer of every
    step with a decode calls it, and the tokens and log-probabilities are those of the torch path (no kernel): the
    wiring (plan, window offsets, rotary tables, value turn-back) is the CPU kernel's, the kernel its own."""
    kv = {"dtype": f"int{bits}", "enabled": False, **({"rotate_values": True} if bits == 4 else {})}
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"}, kv_cache=kv)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = _prompts()[:3] + [list(range(3, 143))]
    generation = _generation()
    generation.max_new_tokens = 10
    cb = ContinuousBatchingConfig(num_blocks=64, page_size=64, max_batch_tokens=64, return_logprobs=True)
    calls = []
    name = "paged_decode_int8_triton" if bits == 8 else "paged_decode_kivi_triton"
    kernel = getattr(paged_decodes, name)
    monkeypatch.setattr(paged_decodes, name, lambda *a, **k: calls.append(a[0].shape[0]) or kernel(*a, **k))
    monkeypatch.setattr(paged_decodes, "decode_kernel", lambda device: "triton")
    by_triton = model.eval().generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    layers = model.config.num_hidden_layers
    assert len(calls) >= 9 * layers and len(calls) % layers == 0 and max(calls) > 1
    monkeypatch.setattr(paged_decodes, "decode_kernel", lambda device: None)
    calls.clear()
    torch_path = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert not calls
    assert [o.generated_tokens for o in by_triton.values()] == [o.generated_tokens for o in torch_path.values()]
    pairs = zip(by_triton.values(), torch_path.values(), strict=True)
    worst = max(abs(a - b) for t, c in pairs for a, b in zip(t.logprobs, c.logprobs, strict=True))
    assert worst < 1e-4, worst


def _allocator(bits: int, config, heads: int, layers: list[int], sectors: int = 4):
    alloc = quantized_allocator(bits)(0, config, heads, torch.float32, 4, layers, True)
    per_sector = lcm(alloc.bytes_per_block, 128)
    cache = torch.zeros((sectors + 2) * per_sector, dtype=torch.uint8)
    pool = CachePool(sectors, 1)
    alloc.register_cache_tensor(per_sector, sectors * per_sector, cache, pool)
    return alloc, pool


@pytest.mark.parametrize("bits", [8])
def test_allocator_rows_round_trip_and_layers_stay_apart(bits):
    config = build_tiny("llama").config
    alloc, pool = _allocator(bits, config, heads=2, layers=[0, 1])
    for _ in range(alloc.needs_new_sectors("r", 0, 6)):
        pool.allocate_sector(0)
    alloc.allocate_cache_to_request("r", 0, 6)
    write = torch.tensor(alloc.get_write_indices("r", 0, 6))
    read = torch.tensor(alloc.get_read_indices("r", 0, 6))
    g = torch.Generator().manual_seed(bits)
    states = {layer: [torch.randn(6, 2, 16, generator=g) for _ in range(2)] for layer in (0, 1)}
    for layer, (k, v) in states.items():
        alloc.update(k, v, layer, torch.empty(0, dtype=torch.long), write)  # a prefill: written, not read
    for layer, (k, v) in states.items():
        keys, values = alloc.update(k[:0], v[:0], layer, read, torch.empty(0, dtype=torch.long))
        assert torch.equal(keys, alloc.key_codec.round_trip(k)) and torch.equal(values, alloc.value_codec.round_trip(v))
    # a decode step reads the past as the pages hold it and its own new token as computed (as_computed)
    for _ in range(alloc.needs_new_sectors("r", 6, 1)):
        pool.allocate_sector(0)
    alloc.allocate_cache_to_request("r", 6, 1)
    write, read = (torch.tensor(f("r", 6, 1)) for f in (alloc.get_write_indices, alloc.get_read_indices))
    new = [torch.randn(1, 2, 16, generator=g) for _ in range(2)]
    keys, values = alloc.update(*new, 0, read, write)
    assert torch.equal(keys[:6], alloc.key_codec.round_trip(states[0][0])) and torch.equal(keys[6:], new[0])
    assert torch.equal(values[:6], alloc.value_codec.round_trip(states[0][1])) and torch.equal(values[6:], new[1])


def test_quantized_pages_hold_more_tokens_in_the_same_bytes(smollm2_dir, tmp_path):
    """SmolLM2's attention shapes (3 KV heads of 64), random weights: at one KV budget (kv_cache.max_memory), int8
    pages hold >= 1.9x the blocks of the model's dtype (bfloat16), int4 >= 3.3x and int2 >= 5x, all inside the
    budget (the int4/int2 windows are taken from those blocks, per running request)."""
    shape = AutoConfig.from_pretrained(smollm2_dir)
    shape.num_hidden_layers = 2
    AutoModelForCausalLM.from_config(shape).save_pretrained(tmp_path)
    blocks = {}
    budget = 4 * 2**20
    for kv in ("auto", "int8", "int4", "int2"):
        config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": kv, "enabled": False, "max_memory": budget})
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16)
        manager = model.init_continuous_batching(
            generation_config=_generation(), continuous_batching_config=ContinuousBatchingConfig(page_size=64)
        )
        manager.warmup()
        cache = manager.batch_processor.cache
        blocks[kv] = sum(a.num_blocks for a in cache.cache_allocators.values())
        assert cache.kv_bytes <= 1.05 * budget
        manager.destroy()
    assert blocks["int8"] >= 1.9 * blocks["auto"] and blocks["int4"] >= 3.3 * blocks["auto"]
    assert blocks["int2"] >= 5 * blocks["auto"]


def test_the_window_comes_out_of_the_pool_and_goes_back(tiny_dirs):
    """int4 pages, 12 blocks: each running request holds its pages and a window of pool blocks, so the scheduler
    runs only as many as both fit (never past the budget), every request still finishes with the tokens a roomy
    cache gives, and every block is back in the pool at the end."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = [list(range(3 + i, 40 + 3 * i)) for i in range(6)]
    generation = _generation()
    generation.max_new_tokens = 30
    roomy = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=_cb())
    tight = ContinuousBatchingConfig(num_blocks=12, page_size=64, max_batch_tokens=128)
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=tight)
    manager.start()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=30)
    results = {r.request_id: r for r in (manager.get_result(timeout=60) for _ in ids)}
    allocator = next(iter(manager.batch_processor.cache.cache_allocators.values()))
    manager.stop(block=True, timeout=60)
    assert allocator.window.blocks_per_slot >= 1 and not allocator.window.slot_of
    assert [results[i].generated_tokens for i in ids] == [o.generated_tokens for o in roomy.values()]
    assert not allocator.block_table and not allocator.window.bound


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_the_pool_count_never_reads_a_cache_still_being_built(tiny_dirs, monkeypatch, kv):
    """A server's publishing thread reads ``pool_blocks()`` while the engine thread builds its cache: the cache is
    counted once built, never midway (midway it has no allocators, and the reading thread died of it)."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": kv, "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    built = cb_cache.PagedAttentionCache.__init__
    midway = []

    def building(self, *args, **kwargs):
        midway.append(continuous.pool_blocks())  # raised AttributeError when the cache was counted before this
        built(self, *args, **kwargs)

    monkeypatch.setattr(cb_cache.PagedAttentionCache, "__init__", building)
    manager = model.init_continuous_batching(generation_config=_generation(), continuous_batching_config=_cb())
    manager.start()
    try:
        manager.add_request(list(range(3, 20)), request_id="r", max_new_tokens=2)
        assert manager.get_result(timeout=60).error is None
        assert midway, "the cache was not built through Transformers' __init__"
        assert continuous.pool_blocks()[1] > 0  # counted (its free blocks) now that it is built
    finally:
        manager.stop(block=True, timeout=60)


def test_windowed_pages_refuse_a_page_the_key_group_does_not_divide(tiny_dirs):
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    cb = ContinuousBatchingConfig(num_blocks=8, page_size=16)
    with pytest.raises(ValueError, match="page_size 16 is not a multiple of the key group"):
        model.generate_batch([[5, 6, 7]], generation_config=_generation(), continuous_batching_config=cb)


def _unpinned_swap():
    """Transformers' CPU swap pins its host buffer, which a machine without an accelerator cannot do: the same
    buffer, unpinned, while the swap is built."""
    init = OffloadingManager.__init__

    def init_unpinned(self, *args, **kwargs):
        empty = torch.empty
        with patch.object(torch, "empty", lambda *shape, pin_memory=False, **kw: empty(*shape, **kw)):
            init(self, *args, **kwargs)

    return patch.object(OffloadingManager, "__init__", init_unpinned)


def _float_blocks_as_num_blocks(config, float_blocks: int, kv_bits: int) -> int:
    """``num_blocks`` taking the bytes of ``float_blocks`` float32 blocks: Transformers 5.24 reads it so; 5.25 counts
    it in the quantized allocator's own blocks."""
    if not NUM_BLOCKS_IN_ALLOCATOR_BYTES:
        return float_blocks
    float_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    return float_blocks * float_token // quantized_allocator(kv_bits).bytes_per_token(config, config.num_key_value_heads)


@pytest.mark.parametrize(
    "dtype, kv_cache, blocks", [("int4", {}, 4), ("int4", {"sink_tokens": 64, "recent_tokens": 64}, 6), ("int2", {}, 6)]
)
def test_cpu_swap_brings_a_windowed_request_back_with_its_window(tiny_dirs, dtype, kv_cache, blocks):
    """Transformers' CPU swap (``cpu_offload_space``) of int4/int2 pages: a swapped-out request comes back with the
    window it had (here the sink and lagging whole groups, which a restored request would otherwise read from the
    quantized pages: log-probabilities 1e-3 to 1e-2 apart), so its tokens and log-probabilities are those of a cache
    roomy enough never to swap; nothing stays parked at the end. Plain int4 (a window that borrows its group's page
    block, and takes cells in shared blocks only past the tokens that block hosts) swaps in a smaller budget."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": dtype, "enabled": False, **kv_cache})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = [list(range(3 + i, 60 + 5 * i)) for i in range(6)]
    generation = _generation()
    generation.max_new_tokens = 200
    roomy = ContinuousBatchingConfig(num_blocks=128, page_size=64, max_batch_tokens=128, return_logprobs=True)
    expected = list(model.generate_batch(prompts, generation_config=generation, continuous_batching_config=roomy).values())
    swapped, allocators = [], []
    offload, build = OffloadingManager._offload_to_cpu, HfVramPagedAttentionCache.__init__

    def counting(self, victims, tables):
        out = offload(self, victims, tables)
        swapped.extend(out)
        return out

    def keeping(self, *args, **kwargs):
        build(self, *args, **kwargs)
        allocators.extend(self.cache_allocators.values())

    blocks = _float_blocks_as_num_blocks(model.config, blocks, KV_BITS[dtype])  # the same bytes in 5.24/5.25
    tight = ContinuousBatchingConfig(
        num_blocks=blocks, page_size=64, max_batch_tokens=128, cpu_offload_space=0.05, return_logprobs=True
    )
    with (
        _unpinned_swap(),
        patch.object(OffloadingManager, "_offload_to_cpu", counting),
        patch.object(HfVramPagedAttentionCache, "__init__", keeping),
    ):
        got = list(model.generate_batch(prompts, generation_config=generation, continuous_batching_config=tight).values())
    assert swapped, "the budget was meant to force a swap"
    assert [o.generated_tokens for o in got] == [o.generated_tokens for o in expected]
    worst = max(abs(a - b) for o, e in zip(got, expected, strict=True) for a, b in zip(o.logprobs, e.logprobs, strict=True))
    assert worst < 3e-4, worst
    assert not allocators[0]._parked and not allocators[0].window.slot_of and not allocators[0].window.held_blocks()


def test_other_models_keep_transformers_own_pages(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    manager = model.init_continuous_batching(generation_config=_generation())
    manager.warmup()
    assert [type(a).__name__ for a in manager.batch_processor.cache.cache_allocators.values()] == ["FullAttentionCacheAllocator"]
    manager.destroy()


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_hf_vram_pages_attend_per_sequence_and_give_the_attention_back(tiny_dirs, kv):
    """While a manager lives, quantized pages attend with hf_vram_varlen: the batch builds no block-diagonal mask,
    and the tokens are those of Transformers' SDPA path over the same pages (float32, 16 mixed prompts). Float K/V
    with SDPA keeps Transformers' own path. Stopping the manager gives the model its attention back."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": kv, "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    manager = model.init_continuous_batching(
        generation_config=_generation(), continuous_batching_config=ContinuousBatchingConfig(num_blocks=64, page_size=64)
    )
    manager.warmup()
    expected = "hf_vram_varlen" if kv == "int8" else "sdpa"
    assert model.config._attn_implementation == expected
    assert (manager.batch_processor.inputs_and_outputs.attention_mask is None) == (kv == "int8")
    manager.destroy()
    assert model.config._attn_implementation == "sdpa"
    if kv == "int8":
        varlen = _batched(model, _prompts())
        with patch("hf_vram.kvcache.continuous._runs_varlen", return_value=False):
            assert _batched(model, _prompts()) == varlen
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma"])
def test_per_sequence_attention_gives_transformers_tokens_across_families(family):
    """int8 pages, 16 mixed prompts in chunks of 32 tokens (later chunks read their past): the same tokens as
    Transformers' SDPA path over the same pages; Mistral with a 16-token sliding window, so prompts longer than it
    take the windowed mask."""
    base = build_tiny(family).float().eval()
    if family == "mistral":
        base.config.sliding_window = 16
    model = hf_vram.optimize(base, hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int8", "enabled": False}))
    cb = {"max_batch_tokens": 32}
    varlen = _batched(model, _prompts(), **cb)
    with patch("hf_vram.kvcache.continuous._runs_varlen", return_value=False):
        assert _batched(model, _prompts(), **cb) == varlen


def test_attention_the_per_sequence_path_lacks_keeps_transformers_path(tiny_dirs):
    """Soft-capped logits or learned attention sinks: the manager keeps SDPA (which computes them) for quantized pages."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int8", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    assert unsupported_reason(model) is None
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    assert unsupported_reason(model) == "attention sinks"
    del model.model.layers[0].self_attn.sinks
    model.config.attn_logit_softcapping = 30.0
    assert unsupported_reason(model) == "attention logit soft-capping"
    manager = model.init_continuous_batching(generation_config=_generation())
    assert model.config._attn_implementation == "sdpa"
    manager.destroy()


def test_a_request_that_cannot_fit_is_a_named_error_with_every_output(tiny_dirs):
    """Nothing silent: a prompt larger than the whole cache fails by name (Transformers alone only logs it and
    returns it with empty tokens); the outputs, the finished one included, come with the error."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int8", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    cb = ContinuousBatchingConfig(num_blocks=1, page_size=16, max_batch_tokens=32)
    with pytest.raises(RequestFailedError, match="1 of 2 request") as err:
        model.generate_batch([[5, 6, 7], list(range(3, 120))], generation_config=_generation(), continuous_batching_config=cb)
    ok, failed = err.value.results.values()
    assert ok.error is None and len(ok.generated_tokens) == NEW_TOKENS
    assert failed.error and not failed.generated_tokens


def test_quantized_kv_attention_reads_through_the_codec_and_restores_the_model():
    from hf_vram.evaluation import quantized_kv_attention

    model = build_tiny("llama").float().eval()
    # int4 quantizes every whole group but the last query's unfinished one (group 0 from query 63 on); int2 keeps the
    # first and the 3 groups before the unfinished one in its int8 window (group 1 read quantized from query 319 on);
    # int4 with a sink and a lagging group (policy) reads group 1 quantized from query 191 on
    ids = torch.randint(3, 300, (1, 400), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model(ids).logits
        with quantized_kv_attention(model, None):
            assert torch.equal(model(ids).logits, plain)
        logits = {}
        for bits in (8, 4, 2):  # int4 unturned here (it turns by default): its window rows then are int8's
            policy = replace(window_policy(4), rotate_values=False) if bits == 4 else None
            with quantized_kv_attention(model, bits, policy=policy):
                logits[bits] = model(ids).logits
        with quantized_kv_attention(model, 4, policy=WindowPolicy(sink_groups=1, lag_groups=1)):
            logits["4 long"] = model(ids).logits
        errors = {bits: ((x - plain).norm() / plain.norm()).item() for bits, x in logits.items()}
        assert 0 < errors[8] < min(errors[4], errors[2]) and max(errors.values()) < 0.5, errors  # never garbage
        for bits, first in ((2, 319), (4, 63), ("4 long", 191)):
            torch.testing.assert_close(logits[bits][:, :first], logits[8][:, :first], rtol=0, atol=1e-5)  # windowed
            assert (logits[bits][:, first:] - logits[8][:, first:]).abs().amax(-1).min() > 1e-4  # read quantized
        for bits in (4, 2):  # values turned (int4's default, int2's ``kv_cache.rotate_values``): every value read differs
            with quantized_kv_attention(model, bits, policy=replace(window_policy(bits), rotate_values=True)):
                turned = model(ids).logits
            assert (turned - logits[bits]).abs().amax(-1).min() > 0
            assert ((turned - plain).norm() / plain.norm()).item() < 0.5
        assert model.config._attn_implementation == "sdpa" and torch.equal(model(ids).logits, plain)


@pytest.mark.parametrize("length", [100, 120])
def test_windowed_pages_fork_and_free_their_window(tiny_dirs, length):
    """int4 pages under parallel sampling: a fork copies the unfinished group's window with the pages (greedy forks
    equal the single request), and when every request is done no window is held. 100 prompt tokens: the fork's
    window holds 36, all in the group's page block; 120: 56, some in cells, which the fork gets copies of."""
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "enabled": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    prompts = [list(range(3, 3 + length)), list(range(7, 40))]
    generation = _generation()
    generation.max_new_tokens = 40
    single = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=_cb())
    generation.num_return_sequences = 2
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=_cb())
    manager.start()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=40)
    results = [manager.get_result(request_id=None, timeout=60) for _ in range(2 * len(ids))]
    allocator = next(iter(manager.batch_processor.cache.cache_allocators.values()))
    manager.stop(block=True, timeout=60)
    assert all(r is not None and r.error is None for r in results)
    expected = {tuple(o.generated_tokens) for o in single.values()}
    assert {tuple(r.generated_tokens) for r in results} == expected and len(results) == 4
    assert not allocator.window.slot_of and not allocator.window.bound  # every window back in the pool
    assert not allocator.window.held_blocks() and not allocator.window.cells.of


def _cb() -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(num_blocks=32, page_size=64, max_batch_tokens=128)


def _one_layer_pages(bits: int, **kv_cache):
    """A ``bits``-bit allocator for one layer of the tiny Llama (2 KV heads of 16), pages of 64 tokens, 40 sectors;
    ``kv_cache``: settings of the model's hf_vram ``kv_cache`` section (e.g. ``sink_tokens``)."""
    config = build_tiny("llama").config
    if kv_cache:
        config.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": f"int{bits}", **kv_cache})
    alloc = quantized_allocator(bits)(0, config, 2, torch.float32, 64, [0], True)
    per_sector = lcm(alloc.bytes_per_block, 128)
    pool = CachePool(40, 1)
    alloc.register_cache_tensor(per_sector, 40 * per_sector, torch.zeros(42 * per_sector, dtype=torch.uint8), pool)
    return alloc, pool


def _six_layer_pages(page: int, **kv_cache):
    """An int4 allocator over six layers of the tiny Llama (2 KV heads of 16), pages of ``page`` tokens, 40 sectors."""
    config = build_tiny("llama").config
    config.num_hidden_layers = 6
    if kv_cache:
        config.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", **kv_cache})
    alloc = quantized_allocator(4)(0, config, 2, torch.float32, page, list(range(6)), True)
    per_sector = lcm(alloc.bytes_per_block, 128)
    pool = CachePool(40, 1)
    alloc.register_cache_tensor(per_sector, 40 * per_sector, torch.zeros(42 * per_sector, dtype=torch.uint8), pool)
    return alloc, pool


def _step(alloc, pool, request: str, past: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    """Schedule and write ``tokens`` new tokens of ``request`` after ``past`` in every layer, as continuous
    batching does; the write indices."""
    for _ in range(alloc.needs_new_sectors(request, past, tokens)):
        pool.allocate_sector(0)
    alloc.allocate_cache_to_request(request, past, tokens)
    write = torch.tensor(alloc.get_write_indices(request, past, tokens))
    for layer in range(6):
        k, v = (torch.randn(tokens, 2, 16, generator=g) for _ in range(2))
        alloc.update(k, v, layer, torch.empty(0, dtype=torch.long), write)
    return write


@pytest.mark.parametrize(("page", "kv_cache"), [(64, {}), (128, {}), (64, {"sink_tokens": 64, "recent_tokens": 64})])
def test_the_window_borrows_its_unfinished_groups_own_page_block_where_that_block_is_the_group(page, kv_cache):
    """A request's unfinished group has a page block of its own, unused until the group is sealed, where a page is
    one key group: the window keeps the group's first tokens there (each layer's rows past that layer's page rows,
    which sealing the layers in order overwrites only once read) and the rest in a block of its own. Where a page
    holds more groups (sealed ones among them), or the window keeps other groups too (sink, lag), nothing is
    borrowed: the window's rows all lie in its own blocks, taken when the request first allocates."""
    alloc, pool = _six_layer_pages(page, **kv_cache)
    window = alloc.window
    borrowing = page == 64 and not kv_cache
    assert window.borrows == borrowing
    write = _step(alloc, pool, "r", 0, 96, torch.Generator().manual_seed(0))
    unfinished = int(write[-1]) // 64  # the group of tokens 64-95 (32 of them), in the window
    slot, place = window.slot_of["r"], int(window.place_of[unfinished])
    assert window.bound[(slot, place)] == unfinished
    own_block = unfinished * 64 // alloc.block_physical_stride
    at = window.offsets(torch.tensor([slot]), torch.tensor([place]), torch.tensor([5]), torch.tensor([unfinished]))
    block_of, in_block = at.reshape(-1) // alloc.bytes_per_block, at.reshape(-1) % alloc.bytes_per_block
    if not borrowing:
        rows = 6 * 2 * window.places * 64
        assert window.blocks_per_slot == math.ceil(rows / window.rows_per_block) == len(window.blocks_of[slot])
        assert set(block_of.tolist()) <= set(window.blocks_of[slot]) and own_block not in window.blocks_of[slot]
        return
    assert window.hosted_tokens == 32  # (rows of 36 bytes: 384 in a block; a layer's pages: 2304 bytes)
    assert not window.blocks_of[slot]  # 32 tokens: all hosted, no block beside the pages
    assert (block_of == own_block).all()
    layers = torch.arange(6).repeat_interleave(2)
    assert (in_block >= layers * alloc.bytes_per_page).all()  # past the layer's page rows
    assert (in_block % window.row_bytes == 0).all()  # on whole rows, which torch's path reads
    assert len(set(at.reshape(-1).tolist())) == 12  # every layer's K and V its own row
    rows = at.reshape(-1, 1) + torch.arange(window.row_bytes)
    assert len(set(rows.reshape(-1).tolist())) == rows.numel()  # no two rows overlap
    with pytest.raises(RuntimeError, match="no window cell"):
        window.offsets(torch.tensor([slot]), torch.tensor([place]), torch.tensor([50]), torch.tensor([unfinished]))


def test_a_borrowing_window_takes_a_cell_per_token_past_the_hosted_ones_from_blocks_windows_share():
    """Where the window borrows, a request's unfinished group takes room beside its pages only for its tokens past
    those its page block hosts (here 32 of 64): a cell each (every layer's K and V rows of one token, together), the
    first one taken by the step that writes the 33rd token and counted by the scheduler first; cells come from
    blocks that every request's window shares (32 cells to a block here), so a second request's cells take no new
    block while the first one's block has room, a cell past a full block takes another, and a block goes back to the
    pool once the groups of all its cells are sealed. What the window held comes back from both places as the int8
    rows it wrote."""
    alloc, pool = _six_layer_pages(64)
    window, g = alloc.window, torch.Generator().manual_seed(1)
    assert (window.hosted_tokens, window.cells.per_block, window.cells.cell_bytes) == (32, 32, 12 * window.row_bytes)
    _step(alloc, pool, "r", 0, 90, g)
    slot = window.slot_of["r"]
    assert alloc.needs_new_blocks("r", 90, 1) == 0 and window.held_blocks() == 0
    for past in range(90, 96):
        _step(alloc, pool, "r", past, 1, g)
    assert window.cells.held(slot) == 0  # tokens 64-95: places 0-31 of the group, all hosted
    assert alloc.needs_new_blocks("r", 96, 1) == 1  # place 32: the first cell, and no cell block held yet
    for _ in range(alloc.needs_new_sectors("r", 96, 1)):
        pool.allocate_sector(0)
    free = pool.count_free_blocks(0)
    write = _step(alloc, pool, "r", 96, 1, g)
    assert window.cells.held(slot) == 1 and window.held_blocks() == 1 and pool.count_free_blocks(0) == free - 1
    group = int(write[0]) // 64
    at = window.offsets(torch.tensor([slot]), torch.tensor([0]), torch.tensor([32]), torch.tensor([group])).reshape(-1)
    assert torch.equal(at - at[0], torch.arange(12) * window.row_bytes)  # token-major: one cell, every layer's rows
    assert int(at[0]) // alloc.bytes_per_block == window.cells.blocks[0]
    k, v = torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, 16, generator=g)
    for past in range(97, 100):  # more cells from the same block: no block counted
        assert alloc.needs_new_blocks("r", past, 1) == 0
        alloc.allocate_cache_to_request("r", past, 1)
        write = torch.tensor(alloc.get_write_indices("r", past, 1))
        for layer in range(6):
            alloc.update(k, v, layer, torch.empty(0, dtype=torch.long), write)
    assert window.cells.held(slot) == 4 and window.held_blocks() == 1
    for position in (3, 35):  # one hosted token, one in a cell: the int8 rows written
        at = window.offsets(torch.tensor([slot]), torch.tensor([0]), torch.tensor([position]), torch.tensor([group]))
        assert (at >= 0).all()
    torch.testing.assert_close(window.read(at[5, 1]), window.as_stored(alloc.values_to_store(v)))  # values turned
    _step(alloc, pool, "s", 0, 100, g)  # a second request, 36 tokens into its group: 4 cells of the same block
    assert window.cells.held(window.slot_of["s"]) == 4 and window.held_blocks() == 1
    for past in range(100, 124):
        _step(alloc, pool, "r", past, 1, g)
    assert window.cells.held(slot) == 28 and window.held_blocks() == 1  # 28 + 4: the block is full
    assert alloc.needs_new_blocks("r", 124, 1) == 1  # a cell past a full block: another block
    for past in range(124, 128):
        _step(alloc, pool, "r", past, 1, g)
    assert window.cells.held(slot) == 32 and window.held_blocks() == 2  # sealed by the step of token 127: cells dead
    blocks = len(alloc.block_table["r"])
    assert alloc.needs_new_blocks("r", 128, 1) == 1  # the next group's page; the dead cells went back
    assert window.cells.held(slot) == 0 and window.held_blocks() == 1  # one block stays: "s" holds cells in it
    _step(alloc, pool, "r", 128, 1, g)
    assert len(alloc.block_table["r"]) == blocks + 1
    for past in range(100, 128):
        _step(alloc, pool, "s", past, 1, g)
    alloc.needs_new_blocks("s", 128, 1)
    assert window.held_blocks() == 0 and not window.cells.free  # the last cells gone: the block is the pool's
    alloc.free_blocks("r")
    alloc.free_blocks("s")
    assert not window.slot_of and not window.cells.of


def test_a_swapped_out_borrowing_window_parks_its_cells_and_gets_them_back():
    """Transformers' CPU swap frees a request's blocks with ``no_cache`` and allocates it again past its tokens: the
    window's cells (its group's tokens past those the page block hosts) go to host memory and come back, as the same
    int8 rows, into the cells of the restored window, bound to the group of its new page block; the cells' block
    goes back to the pool meanwhile."""
    alloc, pool = _six_layer_pages(64)
    window, g = alloc.window, torch.Generator().manual_seed(3)
    _step(alloc, pool, "r", 0, 100, g)  # 36 tokens in the unfinished group: 32 hosted, 4 in cells
    slot = window.slot_of["r"]
    group = alloc.block_table["r"][-1] * alloc.block_physical_stride // 64
    positions = torch.arange(32, 36)

    def cell_rows(slot: int, group: int) -> torch.Tensor:
        n = positions.numel()
        at = window.offsets(torch.full((n,), slot), torch.zeros(n, dtype=torch.long), positions, torch.full((n,), group))
        return torch.stack([window.read(at[layer, kv]) for layer in range(6) for kv in range(2)])

    before = cell_rows(slot, group)
    assert window.cells.held(slot) == 4 and window.held_blocks() == 1
    alloc.free_blocks("r", no_cache=True)
    assert "r" in alloc._parked and alloc._parked["r"].units.shape == (4, window.cells.cell_bytes)
    assert not window.slot_of and window.held_blocks() == 0
    _step(alloc, pool, "s", 0, 100, g)  # another request takes cells (and overwrites whatever the old ones held)
    for _ in range(alloc.needs_new_sectors("r", 100, 1)):
        pool.allocate_sector(0)
    alloc.allocate_cache_to_request("r", 100, 1)
    slot = window.slot_of["r"]
    group = alloc.block_table["r"][-1] * alloc.block_physical_stride // 64
    assert window.cells.held(slot) == 5 and int(window.lookup[group]) == slot  # and room for the step's token
    assert torch.equal(cell_rows(slot, group), before)
    alloc.free_blocks("r")
    alloc.free_blocks("r")  # the swap's own second free, finishing the request
    alloc.free_blocks("s")
    assert not alloc._parked and not window.slot_of and window.held_blocks() == 0


def test_groups_filled_in_one_step_are_quantized_from_their_own_windows():
    """Two requests whose key groups fill in the same decode step, the one with the later blocks first in the batch:
    each group is quantized from its own window (the groups and the windows they are read from stay paired), from
    the int8 rows the window holds: a byte per element and a float16 scale per token and head (values as the
    allocator stores them: turned, int4's always, and read back turned)."""
    alloc, pool = _one_layer_pages(4)
    assert alloc.value_rotation is not None and alloc.codec.row_scale  # int4: one symmetric scale a value row
    g = torch.Generator().manual_seed(0)
    states = {r: [torch.randn(64, 2, 16, generator=g) for _ in range(2)] for r in ("a", "b")}
    for r in ("a", "b"):
        for _ in range(alloc.needs_new_sectors(r, 0, 60)):
            pool.allocate_sector(0)
        alloc.allocate_cache_to_request(r, 0, 60)
        write = torch.tensor(alloc.get_write_indices(r, 0, 60))
        alloc.update(states[r][0][:60], states[r][1][:60], 0, torch.empty(0, dtype=torch.long), write)
    order = sorted(("a", "b"), key=lambda r: -alloc.block_table[r][0])  # the later blocks first
    for t in range(60, 64):
        for r in order:
            for _ in range(alloc.needs_new_sectors(r, t, 1)):  # the window's cells outgrow their shared block
                pool.allocate_sector(0)
            alloc.allocate_cache_to_request(r, t, 1)
        write = torch.tensor([alloc.get_write_indices(r, t, 1)[0] for r in order])
        keys = torch.cat([states[r][0][t : t + 1] for r in order])
        values = torch.cat([states[r][1][t : t + 1] for r in order])
        alloc.update(keys, values, 0, torch.empty(0, dtype=torch.long), write)
    codec = alloc.codec
    assert alloc.window.row_bytes == 2 * (16 + 2)  # 2 heads of 16: 36 bytes a row, not float32's 128
    for r in ("a", "b"):
        read = torch.tensor(alloc.get_read_indices(r, 64, 0))
        keys, values = alloc.update(states[r][0][:0], states[r][1][:0], 0, read, torch.empty(0, dtype=torch.long))
        start = torch.zeros(1, dtype=torch.long)
        stored = (states[r][0], alloc.values_to_store(states[r][1]))
        k, v = (alloc.window.as_stored(x) for x in stored)  # the window's int8 rows: what a group is made from
        key_rows, value_rows = codec.encode(k[None], v, start)
        assert torch.equal(keys, codec.decode_keys(key_rows, value_rows, torch.float32, start))
        assert torch.equal(values, codec.decode_values(value_rows, torch.float32))
        assert not alloc.window.bound


@pytest.mark.parametrize(
    ("bits", "kv_cache", "sink", "lag"),
    [
        (2, {}, 1, 3),
        (4, {}, 0, 0),
        (4, {"sink_tokens": 64, "recent_tokens": 64}, 1, 1),
        (4, {"recent_tokens": 128}, 0, 2),
        (2, {"rotate_values": True}, 1, 3),
    ],
    ids=["int2", "int4", "int4-sink-64-recent-64", "int4-recent-128", "int2-values-turned"],
)
def test_window_keeps_the_sink_and_lagging_groups_then_lets_the_oldest_go(bits, kv_cache, sink, lag):
    """One request: a 330-token prefill (groups 0-4 whole, 10 tokens of group 5), then decode to 420 tokens. After
    every step the read returns the step's own tokens as computed and the rest exactly as ``windowed_round_trip``
    says the query sees them: the sink (group 0) and the last ``lag`` whole groups from the int8 window (by default
    int2: both, 3 lagging; int4: neither; or what ``kv_cache.sink_tokens`` / ``recent_tokens`` say), older groups
    quantized (group 1 from the prefill on), the unfinished group windowed; at the end the window holds the sink,
    groups 6 - lag .. 5 and the unfinished group 6."""
    alloc, pool = _one_layer_pages(bits, **kv_cache)
    assert (alloc.policy.sink_groups, alloc.policy.lag_groups) == (sink, lag)
    g = torch.Generator().manual_seed(3)
    keys, values = (torch.randn(420, 2, 16, generator=g) * torch.linspace(0.5, 4, 16) for _ in range(2))

    def step(past: int, new: int):
        for _ in range(alloc.needs_new_sectors("r", past, new)):
            pool.allocate_sector(0)
        alloc.allocate_cache_to_request("r", past, new)
        write = torch.tensor(alloc.get_write_indices("r", past, new))
        read = torch.tensor(alloc.get_read_indices("r", past, new))
        k, v = alloc.update(keys[past : past + new], values[past : past + new], 0, read, write)
        if bits == 4 or kv_cache.get("rotate_values"):  # stored turned (int4 always): the cache turns them back
            assert alloc.value_rotation is not None
            v = rotate(v, alloc.value_rotation)
        as_batch = [x[: past + new].transpose(0, 1)[None] for x in (keys, values)]
        expected = windowed_round_trip(*as_batch, bits, frame=alloc.codec.frame, policy=alloc.policy)
        expected = [x[0].transpose(0, 1) for x in expected]
        for e, x in zip(expected, (keys, values), strict=True):  # the step's own tokens: as computed
            e[past:] = x[past : past + new]
        torch.testing.assert_close(k, expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(v, expected[1], rtol=0, atol=1e-5)
        return k

    assert torch.equal(step(0, 330), keys[:330])  # a prefill attends to its own tokens as computed
    read = step(330, 1)
    assert not torch.allclose(read[64:128], alloc.window.as_stored(keys[64:128]), atol=1e-3)  # group 1: quantized
    sink_read = alloc.window.as_stored(keys[:64]) if sink else read[:64]
    torch.testing.assert_close(read[:64], sink_read, rtol=0, atol=1e-6)  # the sink: the window's int8 rows
    for past in range(331, 420):
        step(past, 1)
    table, per_block = alloc.block_table["r"], alloc.block_physical_stride // alloc.group  # a page: 1 key group
    held = alloc.window.held(alloc.window.slot_of["r"]).values()
    logical = {table.index(gid // per_block) for gid in held}  # each held group's place in the request
    assert logical == set(range(sink)) | set(range(6 - lag, 7))
