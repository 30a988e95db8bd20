"""Where ``hf-vram serve`` reaches the model Transformers' server loads, on either shape of that server.

Transformers 5.24 loads a served model in the server's own process (``ModelManager._load_model``); 5.25 loads and
runs each one in a spawned process of its own (``EngineClient.start_process``) from a copy of the server's
``ModelLoader``. One ``ServeSettings`` says what hf_vram does to the model on either: the hf_vram config a plain
checkpoint loads with (``--preset``/``--config``), the ``kv_cache`` fields the flags set, a LoRA adapter. On 5.25
``HfVramModelLoader`` carries them into the model's process, which imports this module to rebuild it, and with it
hf_vram (its quantizer, its continuous-batching cache); there it also publishes the K/V pool's blocks to a file the
server's ``/metrics`` reads (``PoolFile``), since the pool lives in that process.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hf_vram.config import QUANT_METHOD
from hf_vram.config.sections import KVCacheSection
from hf_vram.kernels import cpu_extension
from hf_vram.kvcache.continuous import pool_blocks
from hf_vram.recovery.lora import load_lora_adapter
from hf_vram.serving.steady_memory import steady_memory

try:  # Transformers >= 5.25: loading moved out of the model manager into a loader the model's process gets
    from transformers.cli.serving.model_manager import ModelLoader
except ImportError:  # 5.24, or serving's extras not installed
    ModelLoader = None

KV_FLAGS_ON_A_PLAIN_MODEL = (
    "hf-vram serve: --kv-bits/--kv-memory/--step-prefill-tokens set hf_vram's KV pages, and this model is not an "
    "hf_vram model; serve a folder saved by hf_vram, or add --preset (e.g. --preset int8) to optimize it as it loads."
)
PUBLISH_SECONDS = 0.2  # how often the model's process writes its pool's blocks (a /metrics read sees them this old)


def apply_kv_overrides(model, fields: dict) -> None:
    """Set the loaded model's ``kv_cache`` section (continuous batching reads it when it builds its cache)."""
    if not fields:
        return
    config = getattr(model.config, "quantization_config", None)
    if getattr(config, "quant_method", None) != QUANT_METHOD:
        raise ValueError(KV_FLAGS_ON_A_PLAIN_MODEL)
    config.kv_cache = kv_section_with(config.kv_cache, fields)


def kv_section_with(section: KVCacheSection, fields: dict) -> KVCacheSection:
    """``section`` with the flags' ``kv_cache`` fields: a new ``dtype`` through ``storing`` (as the planner sets it,
    so int8 layers go where every layer is int8 or wider), the pool for ``generate`` off (the server batches)."""
    section = section.storing(fields["dtype"]) if "dtype" in fields else section
    return KVCacheSection.from_dict({**section.to_dict(), "enabled": False, **fields})


def with_adapter(model, adapter: str | None):
    """``model`` with the LoRA adapter in ``adapter`` put into its layers, unmerged (PEFT injects the adapter's layers
    in place, so the model object Transformers' server holds runs them), in eval mode."""
    if adapter is None:
        return model
    load_lora_adapter(model, adapter)
    return model.eval()


@dataclass
class PoolFile:
    """A directory where each model's process keeps one file, ``<pid>``, of its pool's ``held free`` blocks."""

    directory: str

    def publish_forever(self) -> threading.Event:
        """In the model's process: rewrite this process's file every ``PUBLISH_SECONDS`` (a daemon thread) until the
        returned event is set, or until the directory is gone (the server that made it stopped and removed it)."""
        path, temporary = Path(self.directory) / str(os.getpid()), Path(self.directory) / f".{os.getpid()}"
        stop = threading.Event()

        def publish() -> None:
            while not stop.wait(PUBLISH_SECONDS):
                try:
                    held, free = pool_blocks()
                except RuntimeError:  # a block table changed size under the read (the engine thread runs on): next time
                    continue  # rather than this thread dying and /metrics showing the last numbers for good
                try:
                    temporary.write_text(f"{held} {free}")
                    os.replace(temporary, path)  # a reader never sees a half-written file
                except FileNotFoundError:  # no directory: no server reads it any more
                    return

        threading.Thread(target=publish, name="hf_vram-pool", daemon=True).start()
        return stop

    def blocks(self) -> tuple[int, int]:
        """In the server's process: ``(held, free)`` summed over the model processes still alive."""
        held, free = 0, 0
        for path in Path(self.directory).glob("[0-9]*"):
            try:
                os.kill(int(path.name), 0)
                h, f = (int(n) for n in path.read_text().split())
            except (OSError, ValueError):  # the process stopped (idle timeout), or the file is being replaced
                continue
            held, free = held + h, free + f
        return held, free


@dataclass
class ServeSettings:
    """What ``hf-vram serve`` does to the model the server loads (see ``server.serve``)."""

    config: object | None = None  # a VramOptimizationConfig for a plain checkpoint, else None
    kv_fields: dict = field(default_factory=dict)
    adapter: str | None = None
    pool_file: PoolFile | None = None

    def quantization_config(self):
        """A fresh copy of the config per load (``from_pretrained`` keeps and edits the one it gets), or None."""
        return copy.deepcopy(self.config) if self.config is not None else None

    def finish(self, model):
        """The loaded model with the ``kv_cache`` fields set and the adapter in its layers."""
        apply_kv_overrides(model, self.kv_fields)
        return with_adapter(model, self.adapter)


SETTINGS = ServeSettings()  # set by ``server.install`` in the server's process; each loader carries a copy


if ModelLoader is not None:

    class HfVramModelLoader(ModelLoader):
        """Transformers' loader with ``ServeSettings`` applied in the model's process (see the module docstring)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.hf_vram = copy.copy(SETTINGS)

        def get_quantization_config(self):
            config = self.hf_vram.quantization_config()
            return config if config is not None else super().get_quantization_config()

        def _load_model(self, *args, **kwargs):
            steady_memory()  # its mmap threshold is this process's own (the caches' settings came in its environment)
            if self.device in ("cpu", "auto"):
                cpu_extension.load()  # built before the model answers, not by its first request's cache
            model = self.hf_vram.finish(super()._load_model(*args, **kwargs))
            if self.hf_vram.pool_file is not None:
                self.hf_vram.pool_file.publish_forever()
            return model

else:
    HfVramModelLoader = None
