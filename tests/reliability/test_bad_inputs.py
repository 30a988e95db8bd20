"""The bad-input battery: every bad input gets an error that names the problem and the fix, and changes nothing.

Each case builds its input, runs the operation, and checks (1) the exception type and message, (2) that the model
it was given is unchanged (same module types, bit-identical tensors) and (3) that the checkpoint files it read are
byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig

import hf_vram
from hf_vram import VramOptimizationConfig as Config
from hf_vram.hf.integrity import write_manifest
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    name: str
    run: Callable[[Path], object]  # gets a scratch folder; returns nothing, must raise
    error: type | tuple
    message: str  # a regex: the problem and the fix
    model: Callable[[], torch.nn.Module] | None = None  # the model the case must leave untouched


def _snapshot(model: torch.nn.Module) -> tuple[list, dict]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- builders ---------------------------------------------------------------------------------------------------
_MODELS: dict[str, torch.nn.Module] = {}


def _tiny(arch: str = "llama") -> torch.nn.Module:
    if arch not in _MODELS:
        _MODELS[arch] = build_tiny(arch)
    return _MODELS[arch]


def _neox() -> torch.nn.Module:
    if "neox" not in _MODELS:
        cfg = GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
        _MODELS["neox"] = AutoModelForCausalLM.from_config(cfg)
    return _MODELS["neox"]


def _poisoned(value: float, where: str) -> torch.nn.Module:
    key = f"poison-{value}-{where}"
    if key not in _MODELS:
        model = build_tiny("llama", seed=3)
        with torch.no_grad():
            model.get_submodule(where).weight[0, 0] = value
        _MODELS[key] = model
    return _MODELS[key]


def _saved(scratch: Path, scheme: str = "int8") -> Path:
    model = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": scheme, "quantize_embeddings": True}})
    out = scratch / f"saved-{scheme}"
    model.save_pretrained(out)
    return out


def _edit_tensors(folder: Path, edit: Callable[[dict], None], manifest: bool = True) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if manifest:
        write_manifest(folder)  # a folder that looks consistent: the content checks must catch it


def _load(folder: Path) -> None:
    AutoModelForCausalLM.from_pretrained(folder)


def _truncated(scratch: Path) -> Path:
    out = _saved(scratch)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


def _flipped(scratch: Path) -> Path:
    out = _saved(scratch)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    return out


def _drop(key_end: str):
    def edit(t: dict) -> None:
        del t[next(k for k in t if k.endswith(key_end))]

    return edit


def _retype(key_end: str, dtype: torch.dtype):
    def edit(t: dict) -> None:
        k = next(k for k in t if k.endswith(key_end))
        t[k] = t[k].to(dtype)

    return edit


def _reshape(key_end: str):
    def edit(t: dict) -> None:
        k = next(k for k in t if k.endswith(key_end))
        t[k] = t[k][:, :-1].contiguous()

    return edit


def _newer_version(scratch: Path) -> Path:
    out = _saved(scratch)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    return out


def _request_larger_than_the_cache(scratch: Path) -> None:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = hf_vram.optimize(_tiny(), {"kv_cache": {"dtype": "int8", "enabled": False}})
    cb = ContinuousBatchingConfig(num_blocks=1, page_size=16, max_batch_tokens=32)
    model.generate_batch([[5, 6, 7], list(range(3, 120))], max_new_tokens=4, continuous_batching_config=cb)


def _empty_prompt(scratch: Path) -> None:
    model = hf_vram.optimize(_tiny(), {"quantization": {"scheme": "int8"}})
    model.generate_batch([[5, 6, 7], []], max_new_tokens=4)


def _bad_yaml(scratch: Path) -> None:
    path = scratch / "bad.yaml"
    path.write_text("quantization: {scheme: int8\n  group_size: [")
    Config.from_yaml(path)


def _config(**kw):
    return lambda scratch: Config(**kw)


def _optimize(model_fn, config, ids=None):
    return lambda scratch: hf_vram.optimize(model_fn(), config, ids)


CASES = [
    # -- configs ------------------------------------------------------------------------------------------------
    Case(
        "unsupported bit width",
        _config(quantization={"scheme": "int3"}),
        ValueError,
        r"quantization\.scheme='int3' is invalid; allowed: .*'int8'",
    ),
    Case(
        "group size zero",
        _config(quantization={"scheme": "int4", "group_size": 0}),
        ValueError,
        r"group_size=0 is invalid; allowed: 32, 64, 128 or 256",
    ),
    Case(
        "negative group size",
        _config(quantization={"scheme": "int4", "group_size": -64}),
        ValueError,
        r"group_size=-64 is invalid; allowed: 32, 64",
    ),
    Case(
        "group size not a power of two",
        _config(quantization={"scheme": "int4", "group_size": 100}),
        ValueError,
        r"group_size=100 is invalid; allowed: 32, 64, 128 or 256",
    ),
    Case("pruning ratio 1", _config(pruning={"head_ratio": 1.0}), ValueError, r"head_ratio=1\.0 is invalid; allowed"),
    Case("negative pruning ratio", _config(pruning={"mlp_ratio": -0.1}), ValueError, r"mlp_ratio=-0\.1 is invalid"),
    Case(
        "pruning every head of a layer",
        _config(pruning={"head_ratio": {0: 1.0}}),
        ValueError,
        r"head_ratio.*1\.0.*(invalid|allowed)",
    ),
    Case("unknown key", _config(quantization={"bits": 4}), ValueError, r"unknown key\(s\) \['bits'\].*known keys"),
    Case("unknown section", _config(speculation={}), ValueError, r"unknown section\(s\) \['speculation'\]; known"),
    Case("config from a newer hf_vram", _config(format_version=99), ValueError, r"newer hf_vram.*pip install -U hf-vram"),
    Case("invalid YAML", _bad_yaml, ValueError, r"invalid YAML in .*bad\.yaml"),
    Case("unparseable memory budget", _config(target_memory="lots"), ValueError, r"target_memory='lots'.*'600MiB'"),
    Case(
        "unknown per-layer scheme",
        _config(quantization={"scheme": "int8", "layer_schemes": {"x": "int3"}}),
        ValueError,
        r"layer_schemes\['x'\]='int3' is invalid; allowed",
    ),
    Case("KV block size not a power of two", _config(kv_cache={"block_size": 12}), ValueError, r"a power of two"),
    Case("distillation weight above 1", _config(recovery={"alpha": 1.5}), ValueError, r"recovery\.alpha=1\.5"),
    # -- models -------------------------------------------------------------------------------------------------
    Case(
        "skip list names no module",
        _optimize(_tiny, {"quantization": {"scheme": "int8", "modules_to_not_convert": ["mlp_proj"]}}),
        ValueError,
        r"'mlp_proj' matches no module.*dotted suffix",
        _tiny,
    ),
    Case(
        "per-layer scheme names no layer",
        _optimize(_tiny, {"quantization": {"scheme": "int8", "layer_schemes": {"model.layers.9.mlp.up_proj": "int4"}}}),
        ValueError,
        r"not linear layers of this model",
        _tiny,
    ),
    Case(
        "pruning an unsupported architecture",
        _optimize(_neox, {"pruning": {"head_ratio": 0.25, "method": "magnitude"}}),
        NotImplementedError,
        r"GPTNeoXAttention",
        _neox,
    ),
    Case(
        "fusing an unsupported architecture",
        _optimize(_neox, {"fusion": {"enabled": True}}),
        NotImplementedError,
        r"GPTNeoX",
        _neox,
    ),
    Case(
        "NaN in a weight",
        _optimize(
            lambda: _poisoned(float("nan"), "model.layers.1.mlp.down_proj"),
            {"pruning": {"mlp_ratio": 0.2, "method": "magnitude"}, "quantization": {"scheme": "int4", "group_size": 32}},
        ),
        ValueError,
        r"NaN/Inf .*down_proj.*modules_to_not_convert\. The model was not changed",
        lambda: _poisoned(float("nan"), "model.layers.1.mlp.down_proj"),
    ),
    Case(
        "Inf in the embedding",
        _optimize(
            lambda: _poisoned(float("inf"), "model.embed_tokens"),
            {"quantization": {"scheme": "int8", "quantize_embeddings": True}},
        ),
        ValueError,
        r"NaN/Inf .*embed_tokens",
        lambda: _poisoned(float("inf"), "model.embed_tokens"),
    ),
    Case(
        "bitsandbytes through optimize",
        _optimize(_tiny, {"quantization": {"scheme": "nf4", "backend": "bitsandbytes"}}),
        NotImplementedError,
        r"use from_pretrained\(path",
        _tiny,
    ),
    Case(
        "budget nothing fits",
        _optimize(_tiny, Config(target_memory=2000), torch.randint(3, 300, (2, 16))),
        ValueError,
        r"nothing fits .* Raise target_memory",
        _tiny,
    ),
    Case(
        "estimate without a config",
        lambda scratch: hf_vram.estimate(scratch),
        FileNotFoundError,
        r"no config\.json .*local model folder",
    ),
    # -- checkpoints (the files must stay byte-identical) ---------------------------------------------------------
    Case("truncated weights file", lambda s: _load(_truncated(s)), ValueError, r"is truncated.*Save the model again"),
    Case(
        "corrupted weights (one byte)",
        lambda s: _load(_flipped(s)),
        ValueError,
        r"is corrupted.*Save the model again or re-download",
    ),
    Case(
        "checkpoint missing a tensor",
        lambda s: _load(_edited(s, _drop("q_proj.scales"))),
        ValueError,
        r"q_proj\.scales was not in the checkpoint.*save the model again",
    ),
    Case(
        "tensor of the wrong dtype",
        lambda s: _load(_edited(s, _retype("q_proj.qweight", torch.float32))),
        ValueError,
        r"qweight is float32, the config needs int8.*save it again",
    ),
    Case(
        "tensor of the wrong shape",
        lambda s: _load(_edited(s, _reshape("q_proj.qweight"))),
        (RuntimeError, ValueError),
        r"(?i)size|shape|mismatch",
    ),
    Case("checkpoint from a newer hf_vram", lambda s: _load(_newer_version(s)), ValueError, r"newer hf_vram.*Upgrade"),
    Case("missing weights file", lambda s: _load(_removed(s)), (OSError, ValueError), r"(?i)no file named|missing"),
    # -- the KV pool ------------------------------------------------------------------------------------------------
    Case(
        "request larger than the whole KV cache",
        _request_larger_than_the_cache,
        RuntimeError,
        r"1 of 2 request\(s\) failed in continuous batching \(first: req_1: .*\); the outputs",
    ),
    Case(
        "empty prompt",
        _empty_prompt,
        ValueError,
        r"empty prompt has nothing to continue from.*at least one token.*Nothing was added",
    ),
    Case(
        "pool budget below two blocks",
        lambda s: hf_vram.KVCachePool.for_model(_tiny(), max_memory="1KB"),
        ValueError,
        r"at least 2 are needed.*Raise max_memory",
    ),
    Case(
        "pool size unparseable",
        lambda s: hf_vram.KVCachePool.for_model(_tiny(), max_memory="big"),
        ValueError,
        r"max_memory='big' is invalid",
    ),
    # -- recovery ---------------------------------------------------------------------------------------------------
    Case(
        "DoRA on quantized layers",
        lambda s: hf_vram.add_lora(_quantized(), r=2, use_dora=True),
        ValueError,
        r"use_dora=False",
        lambda: _quantized(),
    ),
    Case(
        "top-k cache without a folder",
        lambda s: hf_vram.DistillationCallback(_tiny(), top_k=8),
        ValueError,
        r"needs both top_k and cache_dir",
    ),
]


def _edited(scratch: Path, edit) -> Path:
    out = _saved(scratch)
    _edit_tensors(out, edit)
    return out


def _removed(scratch: Path) -> Path:
    out = _saved(scratch)
    (out / "model.safetensors").unlink()
    return out


def _quantized() -> torch.nn.Module:
    if "int8" not in _MODELS:
        _MODELS["int8"] = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8"}})
    return _MODELS["int8"]


def test_the_battery_is_large():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(case, tmp_path):
    _MODELS.clear()  # fresh models per case: a case that wrongly changed one must not hide behind another
    before = _snapshot(case.model()) if case.model else None
    with pytest.raises(case.error) as err:
        case.run(tmp_path)
    assert err.match(case.message), str(err.value)
    if before is not None:
        types, tensors = _snapshot(case.model())
        assert types == before[0] and tensors.keys() == before[1].keys()
        assert all(torch.equal(torch.nan_to_num(tensors[k]), torch.nan_to_num(before[1][k])) for k in tensors)
    for folder in tmp_path.glob("saved-*"):  # a failed load rewrites nothing: same bytes, refused again
        digest = _folder_digest(folder)
        with pytest.raises(case.error):
            _load(folder)
        assert _folder_digest(folder) == digest


def test_saved_model_without_import_hf_vram_is_refused(tmp_path):
    """Plain Transformers cannot import a plugin: AutoModel refuses the checkpoint with the instruction (the model
    card says so too), and the files stay as they were."""
    out = _saved(tmp_path)
    digest = _folder_digest(out)
    code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(out)!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ""},
        timeout=300,
    )
    assert proc.returncode != 0 and "pip install hf-vram, then import hf_vram before from_pretrained" in proc.stderr
    assert "import hf_vram" in (out / "README.md").read_text() and _folder_digest(out) == digest
    shutil.rmtree(out)


def test_no_pickle_loading_anywhere_in_the_package():
    """Safe formats: hf_vram reads weights with safetensors only; torch.load (pickle) is never called."""
    sources = [p.read_text() for p in (ROOT / "hf_vram").rglob("*.py")]
    assert sources and not any("torch.load(" in s or "pickle" in s for s in sources)
