"""Checkpoint integrity: a manifest of file sizes and hashes written at save, verified before a load.

safetensors refuses a file whose header is broken, but a flipped byte in the tensor data loads silently as wrong
numbers, and a file cut short may fail deep inside Transformers with an unhelpful message. hf_vram writes
``hf_vram_manifest.json`` (size and BLAKE2b of every weight file) into each saved folder and, when a local
hf_vram checkpoint is loaded, checks the files against it first and names the broken file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from hf_vram.quant.apply import QUANTIZED_MODULES

MANIFEST = "hf_vram_manifest.json"
_CHUNK = 1 << 22


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> None:
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "blake2b": _digest(p)} for p in sorted(folder.glob("*.safetensors"))}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _check_header(path: Path) -> None:
    """A safetensors file must hold its header and every byte the header points at."""
    size = path.stat().st_size
    fix = "Save the model again (or re-download it); the file on disk is incomplete."
    if size < 8:
        raise ValueError(f"hf_vram: checkpoint file {path} is truncated ({size} bytes). {fix}")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"hf_vram: checkpoint file {path} is truncated inside its header. {fix}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"hf_vram: checkpoint file {path} has a corrupted header ({err}). {fix}") from err
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ValueError(
            f"hf_vram: checkpoint file {path} is truncated: {size} bytes, its header needs {8 + header_len + end}. {fix}"
        )


_SAFETENSORS_DTYPES = {
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "BOOL": "bool",
}


def _headers(folder: Path) -> dict[str, str]:
    """Tensor name -> dtype name, from the headers of every weight file (nothing else is read)."""
    dtypes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        dtypes.update({k: _SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return dtypes


def check_quantized_dtypes(model, folder: str | Path) -> None:
    """Integer codes saved as another dtype would be cast silently by the loader: refuse them by name."""
    saved = _headers(Path(folder))
    wrong = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_MODULES):
            for buf_name, buf in module.named_buffers(recurse=False):
                key = f"{name}.{buf_name}"
                expected = str(buf.dtype).removeprefix("torch.")
                if key in saved and saved[key] != expected and not buf.is_floating_point():
                    wrong.append(f"{key} is {saved[key]}, the config needs {expected}")
    if wrong:
        raise ValueError(
            "hf_vram: the checkpoint's tensors do not match its saved hf_vram config: "
            + "; ".join(wrong[:3])
            + ". It was written by another tool or config; save it again from the hf_vram model, or load the float "
            "checkpoint with a fresh VramOptimizationConfig."
        )


def verify_folder(folder: str | Path) -> None:
    """Refuse a local checkpoint whose weight files are truncated, corrupted or missing (before anything loads)."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        _check_header(path)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return  # written by an older hf_vram or by hand: the header checks above are what can be done
    for name, expected in json.loads(manifest.read_text())["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"hf_vram: checkpoint file {path} is missing; copy the whole saved folder, or save again.")
        if path.stat().st_size != expected["bytes"] or _digest(path) != expected["blake2b"]:
            raise ValueError(
                f"hf_vram: checkpoint file {path} is corrupted: its contents differ from what hf_vram wrote at save "
                f"time ({MANIFEST}). Save the model again or re-download it; do not use these weights."
            )
