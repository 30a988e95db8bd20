"""A saved hf_vram checkpoint names its own model type, so that Transformers without hf_vram refuses it loudly.

Transformers treats an unknown quantization method as no quantization: it logs a warning, leaves hf_vram's
tensors unread and initialises the layers at random, and ``transformers serve`` then answers with HTTP 200 and text
from random weights. An unknown *model type* is different: ``AutoConfig`` (which ``AutoModel*``, pipelines and
``transformers serve`` all go through) raises, quoting the type. So ``save_pretrained`` of an hf_vram model writes
``model_type`` as an instruction (``GUARD_MODEL_TYPE``) and keeps the architecture's own type beside it; once
``import hf_vram`` has run, ``AutoConfig`` maps that type back to the architecture's config class and the model
loads as before. Checkpoints saved before this change (the architecture's type, hf_vram quantization config) load
as they always did with hf_vram.

What it does not cover: loading by an architecture class directly (``LlamaForCausalLM.from_pretrained``), which
Transformers lets through with a model-type mismatch warning. Upstream would need one thing to close that: an
unknown ``quant_method`` in a checkpoint's config raising instead of warning.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_vram.config import QUANT_METHOD

GUARD_MODEL_TYPE = "hf_vram (pip install hf-vram, then import hf_vram before from_pretrained)"
BASE_MODEL_TYPE_KEY = "hf_vram_model_type"


def unwrap(config_dict: dict) -> dict:
    """The config as the architecture knows it: its own ``model_type`` back, the guard's key gone."""
    plain = {k: v for k, v in config_dict.items() if k != BASE_MODEL_TYPE_KEY}
    if config_dict.get("model_type") == GUARD_MODEL_TYPE:
        if BASE_MODEL_TYPE_KEY not in config_dict:
            raise ValueError(
                f"hf_vram: this config.json says model_type {GUARD_MODEL_TYPE!r} but has no {BASE_MODEL_TYPE_KEY!r} "
                "naming the architecture's own type (e.g. 'llama'); the file was edited or cut. Restore it from the "
                "saved checkpoint."
            )
        plain["model_type"] = config_dict[BASE_MODEL_TYPE_KEY]
    return plain


class HfVramCheckpointConfig(PreTrainedConfig):
    """Registered with ``AutoConfig`` under ``GUARD_MODEL_TYPE``: builds the architecture's own config class."""

    model_type = GUARD_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        plain = unwrap(config_dict)
        return CONFIG_MAPPING[plain["model_type"]].from_dict(plain, **kwargs)


def guard_saved_config(folder: str | Path) -> None:
    """Rewrite ``folder/config.json`` of a saved hf_vram model so that only a process with hf_vram loads it."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD or config.get("model_type") == GUARD_MODEL_TYPE:
        return
    config[BASE_MODEL_TYPE_KEY] = config["model_type"]
    config["model_type"] = GUARD_MODEL_TYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def register() -> None:
    """Idempotent; a re-imported hf_vram points the entry at its new class."""
    AutoConfig.register(GUARD_MODEL_TYPE, HfVramCheckpointConfig, exist_ok=True)
