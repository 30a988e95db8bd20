"""A K/V width per layer (``kv_cache.int8_layers``, at int2 ``int4_layers``): int4/int2 pages whose chosen layers
hold int8 (int4) rows, under Transformers' continuous batching, in the budget arithmetic, the read-back and the layer
choice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import hf_vram
from hf_vram.kernels import cpu_extension, kv_write, paged_decode
from hf_vram.kvcache import paged_decodes
from hf_vram.kvcache.codec import KVCodec
from hf_vram.kvcache.continuous import HfVramPagedAttentionCache, kv_token_capacity, window_tokens
from hf_vram.kvcache.kivi import WindowedKVCodec, window_policy
from hf_vram.kvcache.layer_widths import slot_count, wide_index, wide_span
from hf_vram.kvcache.readback import int8_layers_by_readback, layer_losses, quantized_kv_attention
from hf_vram.kvcache.rope_frame import RopeFrame
from hf_vram.planner.estimate import _page_bytes
from tests.kvcache.test_continuous import _generation, _prompts, _QuantizedReadsLayer


def _model(tiny_dirs, bits: int, wide_layers, width: int = 8, **kv):
    kv_cache = {"dtype": f"int{bits}", "enabled": False, f"int{width}_layers": wide_layers, **kv}
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"}, kv_cache=kv_cache)
    return AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32).eval()


def _long_prompts() -> list[list[int]]:
    return _prompts()[:5] + [list(range(3, 143)), [3 + i % 300 for i in range(330)]]  # whole groups, int2's sink/lag


@pytest.mark.parametrize(("bits", "wide", "width"), [(4, 1, 8), (4, 0, 8), (2, 1, 8), (2, 1, 4), (2, 0, 4)])
def test_int8_layers_compute_what_their_codec_says_beside_the_others(tiny_dirs, bits, wide, width):
    """Continuous batching over int4/int2 pages with one layer widened to int8, or at int2 to int4 (the last, and
    the first, whose place opens each step's bookkeeping) gives exactly the tokens of generate over a cache that
    reads that layer through the int8 codec (as int4 pages with int2's window) and the other as int4/int2 pages
    return it; four requests a step, groups filled by decodes and by prefills, int2's sink and lagging groups."""
    model = _model(tiny_dirs, bits, [wide], width)
    generation = _generation()
    generation.max_new_tokens = 72
    cb = ContinuousBatchingConfig(num_blocks=64, page_size=64, max_batch_tokens=128, max_requests_per_batch=4)
    out = model.generate_batch(_long_prompts(), generation_config=generation, continuous_batching_config=cb)
    assert all(o.error is None for o in out.values()), [o.error for o in out.values()]
    frame = RopeFrame.for_config(model.config, model.config.head_dim)

    def cache():
        c = DynamicCache(config=model.config)
        window = window_policy(bits)  # the window is the pages' own: an int4 layer in int2 pages keeps int2's
        c.layers = [_QuantizedReadsLayer(width if i == wide else bits, frame, window) for i in range(len(c.layers))]
        return c

    prompts = _long_prompts()
    expected = [model.generate(torch.tensor([p]), generation_config=generation, cache=cache())[0, len(p) :] for p in prompts]
    assert [o.generated_tokens for o in out.values()] == [e.tolist() for e in expected]
    # and the widened layer is read as int8, not as the others: the plain pages' log-probabilities differ
    cb.return_logprobs = True
    runs = [
        _model(tiny_dirs, bits, layers, width).generate_batch(
            prompts, generation_config=generation, continuous_batching_config=cb
        )
        for layers in ([wide], None)
    ]
    pairs = zip(*(r.values() for r in runs), strict=True)
    assert max(abs(a - b) for w, p in pairs for a, b in zip(w.logprobs, p.logprobs, strict=True)) > 1e-5


@pytest.mark.parametrize(("bits", "width"), [(4, 8), (2, 8), (2, 4)])
def test_the_kernels_read_int8_layers_as_int8_pages_and_the_rest_as_kivi(tiny_dirs, monkeypatch, bits, width):
    """With hf_vram's CPU kernels the widened layer's decodes go to the int8 page kernel (its rows written by the
    int8 row writer), an int4 layer's in int2 pages to the KIVI kernel at 4 bits, the other layer's to the KIVI
    kernel, and the tokens are the torch path's (kernels off)."""
    if not cpu_extension.compiler_present():
        pytest.skip("no C++ compiler here: the torch path is what runs (the next assertion would be vacuous)")
    assert paged_decode.kernel_available(), "hf_vram's CPU kernel failed to build with the compiler on PATH"
    model = _model(tiny_dirs, bits, [1], width)
    generation = _generation()
    generation.max_new_tokens = 40
    calls = {"paged_decode_int8": 0, "paged_decode_kivi": 0, "kivi at 4 bits": 0}
    for name in ("paged_decode_int8", "paged_decode_kivi"):
        kernel = getattr(paged_decodes, name)

        def counted(*a, _n=name, _k=kernel, **k):
            calls[_n] += 1
            calls["kivi at 4 bits"] += _n == "paged_decode_kivi" and a[15] == 4  # the bits argument
            return _k(*a, **k)

        monkeypatch.setattr(paged_decodes, name, counted)
    cb = ContinuousBatchingConfig(num_blocks=96, page_size=64, max_batch_tokens=64)
    with_kernel = model.generate_batch(_long_prompts(), generation_config=generation, continuous_batching_config=cb)
    if width == 8:
        assert calls["paged_decode_int8"] >= 39 and calls["paged_decode_int8"] == calls["paged_decode_kivi"]
    else:  # every decode step: the int4 layer's call and the int2 layer's
        assert calls["paged_decode_int8"] == 0 and calls["kivi at 4 bits"] >= 39
        assert calls["paged_decode_kivi"] == 2 * calls["kivi at 4 bits"]
    monkeypatch.setattr(paged_decode, "kernel_available", lambda: False)
    monkeypatch.setattr(kv_write, "kernel_available", lambda: False)
    torch_path = model.generate_batch(_long_prompts(), generation_config=generation, continuous_batching_config=cb)
    assert [o.generated_tokens for o in with_kernel.values()] == [o.generated_tokens for o in torch_path.values()]


@pytest.mark.parametrize(("bits", "width"), [(4, 8), (2, 4)])
def test_on_cuda_the_triton_kernels_read_the_wide_rows(tiny_dirs, monkeypatch, bits, width):
    """The Triton twins (run under the interpreter, the device check answering "triton") read the widened layer's
    rows as int8 pages (at int2, an int4 layer's as int4 KIVI rows): the same tokens and log-probabilities as the
    torch path."""
    model = _model(tiny_dirs, bits, [0], width)
    generation = _generation()
    generation.max_new_tokens = 6
    cb = ContinuousBatchingConfig(num_blocks=64, page_size=64, max_batch_tokens=64, return_logprobs=True)
    prompts = _prompts()[:2] + [list(range(3, 73))]
    calls = []
    name = "paged_decode_int8_triton" if width == 8 else "paged_decode_kivi_triton"
    kernel = getattr(paged_decodes, name)
    wide = (lambda a: True) if width == 8 else (lambda a: a[15] == 4)  # the int4 layer's calls (bits argument)
    monkeypatch.setattr(paged_decodes, name, lambda *a: (wide(a) and calls.append(1)) or kernel(*a))
    monkeypatch.setattr(paged_decodes, "decode_kernel", lambda device: "triton")
    by_triton = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert len(calls) >= 5
    monkeypatch.setattr(paged_decodes, "decode_kernel", lambda device: None)
    torch_path = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    assert [o.generated_tokens for o in by_triton.values()] == [o.generated_tokens for o in torch_path.values()]
    worst = max(
        abs(a - b)
        for t, c in zip(by_triton.values(), torch_path.values(), strict=True)
        for a, b in zip(t.logprobs, c.logprobs, strict=True)
    )
    assert worst < 1e-4, worst


def test_a_widened_layer_costs_its_pages_in_every_count(smollm2_dir, tiny_dirs):
    """SmolLM2's shapes: an int8 row (198 bytes) sits in two int4 rows (206), four int2 rows; the block, the
    capacity of a budget, the int4 window's blocks and the estimate all count the widened layers' extra pages."""
    shape = AutoConfig.from_pretrained(smollm2_dir)
    heads, dim, layers = shape.num_key_value_heads, shape.head_dim, shape.num_hidden_layers
    assert (KVCodec(8, heads, dim).row_bytes, WindowedKVCodec(4, heads, dim).row_bytes) == (198, 103)
    assert wide_span(4, heads, dim) == 2 and wide_span(2, heads, dim) == 4
    plain, wide = AutoConfig.from_pretrained(smollm2_dir), AutoConfig.from_pretrained(smollm2_dir)
    plain.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4"})
    wide.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "int8_layers": [18, 20]})
    assert (slot_count(plain, 4), slot_count(wide, 4)) == (layers, layers + 2)
    budget = 64 * 2**20
    assert kv_token_capacity(wide, budget, "int4") == budget // ((layers + 2) * 2 * 103)
    assert kv_token_capacity(wide, budget, "auto") == kv_token_capacity(plain, budget, "auto")  # bf16 rows: all alike
    assert window_tokens(wide, "int4", 64) > window_tokens(plain, "int4", 64)  # no borrowing: a block of its own
    section = wide.quantization_config.kv_cache
    kept = [(heads, dim, 8192)] * layers
    extra = _page_bytes(kept, 1, 4, section) - _page_bytes(kept, 1, 4, plain.quantization_config.kv_cache)
    assert extra == 2 * 2 * 8192 * 103  # two layers, K and V, one more int4 row each per token
    # at int2 an int4 layer (103- or 108-byte rows, its values turned or not) takes two int2 pages (60 bytes each), not an int8 layer's four
    assert (WindowedKVCodec(2, heads, dim).row_bytes, wide_span(2, heads, dim, 4)) == (60, 2)
    int2, int2_wide = AutoConfig.from_pretrained(smollm2_dir), AutoConfig.from_pretrained(smollm2_dir)
    int2.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int2"})
    int2_wide.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int2", "int4_layers": [18]})
    assert (slot_count(int2, 2), slot_count(int2_wide, 2)) == (layers, layers + 1)
    assert kv_token_capacity(int2_wide, budget, "int2") == budget // ((layers + 1) * 2 * 60)
    sections = (int2_wide.quantization_config.kv_cache, int2.quantization_config.kv_cache)
    assert _page_bytes(kept, 1, 2, sections[0]) - _page_bytes(kept, 1, 2, sections[1]) == 2 * 8192 * 60
    # the allocator's block holds exactly those pages, and wide rows address their own page places
    model = _model(tiny_dirs, 4, [0])
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=64)
    manager = model.init_continuous_batching(generation_config=_generation(), continuous_batching_config=cb)
    manager.warmup()
    cache = manager.batch_processor.cache
    manager.destroy()
    assert isinstance(cache, HfVramPagedAttentionCache)
    allocator = next(iter(cache.cache_allocators.values()))
    assert allocator.pages_per_block == model.config.num_hidden_layers + 1
    assert allocator.bytes_per_block == allocator.pages_per_block * allocator.bytes_per_page
    stride = allocator.block_physical_stride
    rows = torch.tensor([0, 5, stride, stride + 63, 3 * stride + 1])
    assert wide_index(rows, stride, 2).tolist() == [0, 5, stride // 2, stride // 2 + 63, 3 * stride // 2 + 1]


def test_int8_layers_are_refused_where_they_mean_nothing(tiny_dirs):
    """Beside int8 or model-dtype K/V the setting is a config error; a layer the model lacks is refused when the
    pages are built, before any request runs, naming the layers it has."""
    with pytest.raises(ValueError, match="int8_layers.*null unless dtype is int4 or int2"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int8", "int8_layers": [0]})
    with pytest.raises(ValueError, match="distinct layer indices"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "int8_layers": [1, 1]})
    section = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "int8_layers": [1]}).kv_cache
    assert section.storing("int8").int8_layers is None and section.storing("int2").int8_layers == [1]  # the planner's
    with pytest.raises(ValueError, match="int4_layers.*null unless dtype is int2"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int4", "int4_layers": [0]})
    with pytest.raises(ValueError, match="int4_layers.*null while int8_layers is set"):
        hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int2", "int4_layers": [0], "int8_layers": [1]})
    section = hf_vram.VramOptimizationConfig(kv_cache={"dtype": "int2", "int4_layers": 1}).kv_cache
    assert section.storing("int4").int4_layers is None and section.storing("int2").int4_layers == 1
    model = _model(tiny_dirs, 4, [7])
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\], but this model has 2 layers"):
        model.generate_batch(_prompts()[:2], generation_config=_generation())


def test_the_layer_choice_ranks_with_every_whole_group_quantized_in_the_windows_rounding(monkeypatch):
    """A window's sink and recent groups are left out of the ranking (they kept too little of a calibration text
    quantized to tell SmolLM2's layers apart), its rounding (values turned, keys clipped) kept."""
    from hf_vram.kvcache import readback
    from hf_vram.kvcache.kivi import WindowPolicy

    seen = []
    monkeypatch.setattr(readback, "layer_losses", lambda model, ids, bits, policy: seen.append(policy) or [0.1, 0.3, 0.2])
    window = WindowPolicy(sink_groups=1, lag_groups=3, clip_keys=True, rotate_values=True)
    assert int8_layers_by_readback(None, torch.zeros(1, 8), 2, 2, policy=window) == [1, 2]
    assert seen == [WindowPolicy(sink_groups=0, lag_groups=0, clip_keys=True, rotate_values=True)]


def test_the_read_back_reads_int8_layers_as_int8_and_ranks_layers_by_their_own_loss():
    """``quantized_kv_attention`` reads ``int8_layers`` through the int8 codec (every layer listed: the int8
    reading's logits); ``layer_losses`` puts each layer's loss alone against the exact model (no layer quantized:
    the exact logits), and ``int8_layers_by_readback`` keeps the largest."""
    from tests.tiny_models import build_tiny

    model = build_tiny("llama").float().eval()
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = model(ids).logits
        with quantized_kv_attention(model, 4, int8_layers=(0, 1)):
            all_wide = model(ids).logits
        with quantized_kv_attention(model, 8):
            int8 = model(ids).logits
        with quantized_kv_attention(model, 4):
            int4 = model(ids).logits
        with quantized_kv_attention(model, 4, only_layers=()):
            none = model(ids).logits
    assert torch.equal(all_wide, int8) and not torch.equal(int4, int8) and torch.equal(none, exact)
    # int4 layers in int2 pages: int4 groups under int2's window (its sink and 3 lagging groups: past 5 groups)
    longer = torch.randint(3, 300, (1, 400), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with quantized_kv_attention(model, 2, int4_layers=(0, 1)):
            all_int4 = model(longer).logits
        with quantized_kv_attention(model, 4, policy=window_policy(2)):
            int4_in_int2_window = model(longer).logits
        with quantized_kv_attention(model, 2, int4_layers=(1,)):
            one_int4 = model(longer).logits
    assert torch.equal(all_int4, int4_in_int2_window) and not torch.equal(one_int4, all_int4)
    losses = layer_losses(model, ids[0], 4)
    assert len(losses) == 2 and all(loss != 0 for loss in losses)
    assert int8_layers_by_readback(model, ids[0], 1) == [max(range(2), key=lambda i: losses[i])]


@pytest.mark.parametrize(("bits", "field"), [(4, "int8_layers"), (2, "int4_layers")])
def test_a_count_of_int8_layers_is_chosen_when_the_model_is_optimized_and_saved_as_layers(tmp_path, bits, field):
    """``int8_layers: 1`` (at int2 ``int4_layers: 1``) becomes the layer whose int4 (int2) K/V lose most on the
    calibration text (the float model's reading), the config lists it, and the saved model comes back with that
    list and serves over those pages; a model whose config still holds a count is refused before any request runs."""
    from tests.tiny_models import build_tiny

    calibration = torch.randint(3, 300, (2, 160), generator=torch.Generator().manual_seed(3))
    base = build_tiny("llama").float().eval()
    losses = layer_losses(base, calibration, bits, replace(window_policy(bits), sink_groups=0, lag_groups=0))  # as ranked
    config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": f"int{bits}", "enabled": False, field: 1})
    model = hf_vram.optimize(base, config, calibration)
    chosen = getattr(model.config.quantization_config.kv_cache, field)
    assert chosen == [max(range(2), key=lambda i: losses[i])]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert getattr(again.config.quantization_config.kv_cache, field) == chosen
    out = again.generate_batch(_prompts()[:3], generation_config=_generation())
    assert all(o.error is None and len(o.generated_tokens) == 8 for o in out.values())
    counted = AutoModelForCausalLM.from_config(base.config)
    counted.config.quantization_config = hf_vram.VramOptimizationConfig(kv_cache={"dtype": f"int{bits}", field: 1})
    with pytest.raises(ValueError, match=f"{field} is a count \\(1\\).*list the layers"):
        counted.generate_batch(_prompts()[:2], generation_config=_generation())
