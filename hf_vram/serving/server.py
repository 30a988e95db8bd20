"""``hf-vram serve``: Transformers' own OpenAI-compatible server (``transformers serve``), with hf_vram registered.

Nothing of the server is rewritten: this process imports hf_vram (so a saved hf_vram checkpoint loads right, its
fused attention and quantized layers included, and continuous batching builds hf_vram's quantized K/V pages), then
runs Transformers' ``serve`` command with every option the user gave it. Two seams of Transformers' model loading
are wrapped: on 5.24 the model manager's, in this process; on 5.25, which loads each model in a spawned process of
its own, the same two of the ``ModelLoader`` that process gets (``hf_vram.serving.loader``):

- ``get_quantization_config``: a plain checkpoint served with ``--preset``/``--config`` is optimized as it loads
  (the hf_vram config is the quantization config ``from_pretrained`` receives);
- ``_load_model``: ``--kv-bits``/``--kv-memory`` set the loaded hf_vram model's ``kv_cache`` section, which is
  what continuous batching reads for its page format and budget (``hf_vram.kvcache.continuous``); ``--adapter``
  puts a LoRA adapter trained on the compressed model into it, unmerged (``hf_vram.load_lora_adapter``: merging
  re-quantizes, and the int4 grid takes back a short recovery run's update), as vLLM serves LoRA modules.

- ``build_server``: the app it returns gets ``AdmissionMiddleware`` (``hf_vram.serving.admission``): concurrency
  caps for the server and each tenant, a bounded queue, 429 with Retry-After past it, ``/metrics``.

Before the server starts, ``steady_memory`` caps oneDNN's per-shape kernel cache and fixes glibc's mmap threshold
(the soak measured RSS creeping as continuous batching changes batch shapes).

What Transformers' server has and hf_vram inherits: chat/completions/responses with streaming, continuous batching
(``--continuous-batching``), ``--compile``, ``/health``.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hf_vram.config import QUANT_METHOD, VramOptimizationConfig, kv_cache_section
from hf_vram.config.checks import parse_bytes
from hf_vram.config.sections import KVCacheSection
from hf_vram.kernels import cpu_extension
from hf_vram.kvcache.continuous import KV_BITS, kv_token_capacity, window_tokens
from hf_vram.serving import loader
from hf_vram.serving.admission import AdmissionMiddleware, AdmissionPolicy, ServerMetrics
from hf_vram.serving.loader import PoolFile, ServeSettings
from hf_vram.serving.steady_memory import steady_memory

KV_DTYPES = {bits: name for name, bits in KV_BITS.items()}  # --kv-bits 8 -> kv_cache.dtype "int8"
DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED = 64, 256
# Prompt tokens a continuous-batching step carries beside decoding requests (``kv_cache.step_prefill_tokens``,
# ``hf_vram.kvcache.step_budget``) when neither the model's config nor ``--step-prefill-tokens`` names one: on 2
# CPU cores (SmolLM2, int8 weights and K/V, 48 requests at once, ``benchmarks/serve_load.py``) 256 kept p99 time per
# output token at 0.67x `transformers serve`'s where the whole 8192-token step left it at 1.2x, at about the same
# tokens/s (1.44x against 1.38x in one run; 0.95x the uncapped server's in interleaved runs).
DEFAULT_STEP_PREFILL_TOKENS = 256


def saved_hf_vram_config(model: str) -> dict | None:
    """The hf_vram quantization config a local folder's config.json carries, or None (not saved by hf_vram)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant if quant.get("quant_method") == QUANT_METHOD else None


def kv_overrides(kv_bits: int | None, kv_memory: str | None, step_prefill_tokens: int | None = None) -> dict:
    """The ``kv_cache`` fields the flags set, checked the way the config checks them (``step_prefill_tokens`` 0:
    no cap, Transformers' own scheduler)."""
    fields = {} if step_prefill_tokens is None else {"step_prefill_tokens": step_prefill_tokens or None}
    if kv_bits is not None:
        if kv_bits not in KV_DTYPES:
            raise ValueError(f"hf-vram serve: --kv-bits {kv_bits} is not offered; use 8, 4 or 2 (or leave it out).")
        fields["dtype"] = KV_DTYPES[kv_bits]
    if kv_memory is not None:  # a command line gives bytes as text
        fields["max_memory"] = int(kv_memory) if str(kv_memory).strip().isdigit() else kv_memory
    if fields:
        KVCacheSection.from_dict({"enabled": False, **fields})  # raises with the field's rule on a bad value
    return fields


def step_prefill_cap(flag: int | None, saved: dict | None, config: VramOptimizationConfig | None) -> int | None:
    """The ``--step-prefill-tokens`` a server runs: the flag's (0: no cap); else, for an hf_vram model (saved, or
    optimized as it loads), its config's ``kv_cache.step_prefill_tokens`` or ``DEFAULT_STEP_PREFILL_TOKENS``; None
    (nothing to set) for a plain model."""
    if flag is not None or (saved is None and config is None):
        return flag
    configured = (
        config.kv_cache.step_prefill_tokens if config is not None else (saved.get("kv_cache") or {}).get("step_prefill_tokens")
    )
    return configured or DEFAULT_STEP_PREFILL_TOKENS


def check_adapter(adapter: str) -> None:
    """Refuse, before the server starts, an ``--adapter`` that is not a PEFT adapter folder."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(
            f"hf-vram serve: --adapter {adapter} has no adapter_config.json; pass the folder a LoRA adapter was saved "
            "to (peft_model.save_pretrained(dir) after hf_vram.add_lora and training)."
        )


def spawns_model_processes() -> bool:
    """Whether this Transformers' server loads each model in a process of its own (5.25 on) rather than in the
    server's (5.24): where ``install`` has to reach the model (``hf_vram.serving.loader``)."""
    from transformers.cli.serving import model_manager

    return not hasattr(model_manager.ModelManager, "_load_model")


def check_server_seams(serve_args: list[str]) -> None:
    """Refuse, before anything loads, a Transformers server hf-vram serve cannot reach the model of, and options that
    would leave part of the server without hf_vram: unoptimized models or requests past admission, silently."""
    if spawns_model_processes() and loader.HfVramModelLoader is None:
        import transformers

        raise RuntimeError(
            f"hf-vram serve: Transformers {transformers.__version__} loads served models where hf-vram serve does not "
            "reach them; install a version it supports: pip install 'transformers[serving]>=5.24,<5.26'."
        )
    count = serve_option(serve_args, "--api-server-count")
    if count not in (None, "1"):
        raise ValueError(
            f"hf-vram serve: --api-server-count {count} runs API servers in processes of their own, which hf_vram's "
            "admission, quotas and /metrics would not be in front of; leave it out (one API server)."
        )


def install(
    config: VramOptimizationConfig | None, kv_fields: dict, adapter: str | None = None, pool_file: PoolFile | None = None
) -> None:
    """Make the model Transformers' server loads an hf_vram one as ``ServeSettings`` says: on 5.24 by wrapping the
    model manager's two loading seams (described in the module docstring) in this process; on 5.25 by giving the
    server ``HfVramModelLoader``, which applies them in the model's own process (and publishes its pool to
    ``pool_file``)."""
    from transformers.cli.serving import model_manager

    settings = ServeSettings(config, kv_fields, adapter, pool_file)
    if spawns_model_processes():
        loader.SETTINGS = settings
        model_manager.ModelLoader = loader.HfVramModelLoader
        return
    manager = model_manager.ModelManager
    original_quantization, original_load = manager.get_quantization_config, manager._load_model

    def get_quantization_config(self):
        config = settings.quantization_config()
        return config if config is not None else original_quantization(self)

    def _load_model(self, *args, **kwargs):
        return settings.finish(original_load(self, *args, **kwargs))

    manager.get_quantization_config = get_quantization_config
    manager._load_model = _load_model


def served_model_config(model: str, config: VramOptimizationConfig | None = None, kv_fields: dict | None = None):
    """The Transformers config of ``model`` as the server will build its pages from it: with the hf_vram config it
    was saved with or loads with (``--preset``/``--config``), its ``kv_cache`` section as the flags' ``kv_fields``
    leave it (``loader.kv_section_with``). What admission sizes requests by: the raw checkpoint's config lacks a
    preset's sink, recent and widened (int8, int4) layers, which take pages of the same budget."""
    from transformers import AutoConfig

    served = AutoConfig.from_pretrained(model)
    if config is not None:
        quant = copy.deepcopy(config)
    elif kv_cache_section(served) is not None:  # saved by hf_vram (a local folder or a Hub repo): its config as a dict
        quant = VramOptimizationConfig(**served.quantization_config)
    else:
        return served
    quant.kv_cache = loader.kv_section_with(quant.kv_cache, kv_fields or {})
    served.quantization_config = quant
    return served


def request_window_tokens(served, kv_dtype: str, serve_args: list[str]) -> int:
    """Tokens of pages each request's int4/int2 window takes (``hf_vram.kvcache.continuous.window_tokens``) for the
    ``served_model_config``, at the page size the server runs (``--cb-block-size``, else Transformers' default)."""
    from transformers import ContinuousBatchingConfig

    page = serve_option(serve_args, "--cb-block-size")
    page_size = int(page) if page else ContinuousBatchingConfig().page_size
    return window_tokens(served, kv_dtype, page_size)


def request_sizer(model: str, default_new_tokens: int = 256, extra_tokens: int = 0):
    """Body of an OpenAI request -> the KV tokens it may hold: its prompt through the model's tokenizer (and chat
    template), plus ``max_tokens`` (``max_completion_tokens``, ``max_output_tokens``; else ``default_new_tokens``),
    plus ``extra_tokens`` (an int4/int2 request's window)."""
    from transformers import AutoTokenizer

    tokenizer = []  # loaded on the first request, from the folder being served

    def size(body: dict) -> int:
        if not tokenizer:
            tokenizer.append(AutoTokenizer.from_pretrained(model))
        tok = tokenizer[0]
        if "messages" in body:
            text = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        else:
            text = body.get("prompt", body.get("input", ""))
        text = text if isinstance(text, str) else json.dumps(text)
        new = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        return len(tok(text, add_special_tokens=False).input_ids) + int(new or default_new_tokens) + extra_tokens

    return size


def serve_option(serve_args: list[str], name: str) -> str | None:
    """The value of ``name`` among the options passed on to transformers serve (``--name V`` or ``--name=V``)."""
    for i, arg in enumerate(serve_args):
        if arg == name and i + 1 < len(serve_args):
            return serve_args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def kv_budget_tokens(served, kv_memory: int, kv_dtype: str, serve_args: list[str]) -> int:
    """Tokens the pages of the ``served_model_config`` hold in ``kv_memory`` bytes (its widened layers' pages
    counted). Float pages take the model's dtype, as the paged cache does: ``--dtype`` if given, else (``auto``)
    the dtype the checkpoint was saved in."""
    import torch

    name = serve_option(serve_args, "--dtype")
    dtype = getattr(torch, name) if name not in (None, "auto") else served.dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32"))
    return kv_token_capacity(served, kv_memory, kv_dtype, dtype)


def install_admission(
    policy: AdmissionPolicy, metrics: ServerMetrics | None = None, sizer=None, pool: Callable | None = None
) -> ServerMetrics:
    """Every app Transformers' ``build_server`` returns in this process gets the admission middleware; its pool
    gauges read ``pool`` (the model processes' ``PoolFile``), else this process's caches."""
    from transformers.cli.serving import server

    metrics = metrics or ServerMetrics(pool)
    build_server = server.build_server

    def build_with_admission(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_middleware(AdmissionMiddleware, policy=policy, metrics=metrics, sizer=sizer)
        return app

    server.build_server = build_with_admission
    return metrics


def serve(
    model: str,
    serve_args: list[str],
    config: VramOptimizationConfig | None = None,
    kv_bits: int | None = None,
    kv_memory: str | None = None,
    policy: AdmissionPolicy | None = None,
    adapter: str | None = None,
    step_prefill_tokens: int | None = None,
) -> int:
    """Run Transformers' ``serve`` for ``model`` (preloaded) with ``serve_args``, ``adapter`` (a LoRA adapter folder)
    in its layers; returns its exit code."""
    check_server_seams(serve_args)
    saved = saved_hf_vram_config(model)
    if config is not None and saved is not None:
        raise ValueError(
            f"hf-vram serve: {model} was saved by hf_vram and already holds its optimization; serve it without "
            "--preset/--config (--kv-bits and --kv-memory still apply)."
        )
    if "--quantization" in serve_args and config is not None:
        raise ValueError("hf-vram serve: --quantization (bitsandbytes) and --preset/--config are two quantizations; pick one.")
    fields = kv_overrides(kv_bits, kv_memory, step_prefill_cap(step_prefill_tokens, saved, config))
    served = served_model_config(model, config, fields) if fields else None
    if served is not None and kv_cache_section(served) is None:  # refused now, not when the model loads
        raise ValueError(loader.KV_FLAGS_ON_A_PLAIN_MODEL)
    if adapter is not None:
        check_adapter(adapter)
    steady_memory()
    if serve_option(serve_args, "--device") in (None, "cpu", "auto"):
        # built (first run on this machine, or after its source changed) or loaded before the server answers
        # /health: otherwise the first request's cache would build it, seconds of compiler under live traffic
        cpu_extension.load()
    pool_file = PoolFile(tempfile.mkdtemp(prefix="hf_vram-pool-")) if spawns_model_processes() else None
    install(config, fields, adapter, pool_file)
    policy = policy or AdmissionPolicy(DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED)
    sizer = None
    if kv_memory is not None:  # admission by the KV the budget holds, not only by counts
        kv_dtype = kv_cache_section(served).dtype
        policy.kv_tokens = kv_budget_tokens(served, parse_bytes(fields["max_memory"], "--kv-memory"), kv_dtype, serve_args)
        sizer = request_sizer(model, extra_tokens=request_window_tokens(served, kv_dtype, serve_args))
    install_admission(policy, sizer=sizer, pool=pool_file.blocks if pool_file is not None else None)
    from transformers.cli.transformers import app

    try:
        app(["serve", model, *serve_args], prog_name="hf-vram serve", standalone_mode=False)
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        if pool_file is not None:
            shutil.rmtree(pool_file.directory, ignore_errors=True)
    return 0
