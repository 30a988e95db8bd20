"""The YAML presets, shipped inside the package (package data), so ``from_preset("int8")`` and
``hf-vram optimize --preset int8`` work after a plain ``pip install``. The repository's top-level ``configs/`` links
to these same files."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"hf_vram: no preset named {name!r}; available: {', '.join(available_presets()) or 'none'}.")
    return path
