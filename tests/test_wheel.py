"""hf_vram as a user gets it: the wheel built from this tree, installed into a fresh virtual environment, used from
another directory. The presets ship inside the package, so they must work there (not only in a checkout).

The fresh environment sees the already-installed dependencies (torch, Transformers, ...) through a ``.pth`` line
naming this environment's site-packages, so nothing is downloaded; hf_vram itself comes only from the wheel.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh venv holding hf_vram from its wheel."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True,
        cwd=root,
        timeout=300,
    )
    (wheel,) = dist.glob("hf_vram-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_vram/presets/int8.yaml" in names and "hf_vram/presets/int4.yaml" in names, names
    env = root / "env"
    venv.create(env, with_pip=False)
    site = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    site.mkdir(parents=True, exist_ok=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    return env / "bin"


def _run(args: list[str], cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_presets_load_from_the_installed_wheel(installed, tmp_path):
    code = (
        "import hf_vram, pathlib, sys\n"
        "from hf_vram.presets import available_presets\n"
        "assert 'site-packages' in hf_vram.__file__, hf_vram.__file__\n"
        "print(sorted(available_presets()))\n"
        "c = hf_vram.VramOptimizationConfig.from_preset('int8')\n"
        "print(c.quantization.scheme, hf_vram.VramOptimizationConfig.from_preset('int4').quantization.group_size)\n"
    )
    out = _run([str(installed / "python"), "-c", code], tmp_path)
    assert "'int8'" in out and "'serving'" in out and "'recovery'" in out
    assert "int8 128" in out


def test_cli_runs_from_the_installed_wheel(installed, tmp_path):
    out = _run([str(installed / "hf-vram"), "optimize", "--help"], tmp_path)
    assert "--preset" in out and "int4-pruned" in out
