"""Fill ``.gpu-wheels/`` (ignored by git) with exactly the wheels the GPU check needs on the lent GPU machine, and
check that they travel: the device tool carries the working tree plus named folders, 64 MiB per call in all.

    python benchmarks/gpu_wheels.py            # make gpu-wheels: download (here, where the registry is), then check
    python benchmarks/gpu_wheels.py --check    # only the size check of what is already there

Why these and no others (the GPU machine has no package registry; its image already holds torch 2.11.0+cu130,
triton 3.6.0, accelerate, peft, safetensors, PyYAML, numpy, psutil, tokenizers 0.23, huggingface_hub 1.33):

* ``transformers`` 5.24: the image has 5.17, whose continuous-batching package lacks the cache-allocator seam hf_vram
  builds on (``transformers.generation.continuous_batching.cache_allocators``: measured, ``import hf_vram`` then a
  model class fails on 5.17). The wheel is pure Python and its own needs are all in the image, so it is carried
  (13 MB) instead of making hf_vram support two Transformers generations.
* ``regex``: Transformers 5.24 checks ``regex>=2025.10.22`` at import, and the image's version was never read; the
  wheel (under 1 MB) takes the guess out of a call that has no second try to spare.
* ``bitsandbytes`` and ``torchao``: the peers the kernel part times on the same shapes; neither is in the image.
  torchao 0.18 is the release built for torch 2.11.

Each is fetched with ``--no-deps`` for CPython 3.12 on manylinux x86-64, one version each (two versions of one
package stop ``pip install --no-index`` there).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("transformers==5.24.0", "regex==2026.11.19", "bitsandbytes==0.50.2", "torchao==0.18.0")
DEST = ROOT / ".gpu-wheels"
BUDGET_MIB = 64.0
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")


def project_name(wheel: Path) -> str:
    """``torchao-0.18.0-cp310-abi3-...whl`` -> ``torchao`` (names normalised as pip does)."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def download(dest: Path) -> None:
    """Fetch the pinned wheels into ``dest`` and drop any other wheel there (one version of each)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", *platforms, "-d", str(dest), *WHEELS]
    subprocess.run(cmd, check=True, timeout=900)
    wanted = {spec.split("==")[0]: spec.split("==")[1] for spec in WHEELS}
    for wheel in dest.glob("*.whl"):
        if wanted.get(project_name(wheel)) != wheel.name.split("-")[1]:
            wheel.unlink()


def travelling_tree_bytes(root: Path) -> int:
    """Bytes of what the device tool sends besides carried folders: tracked files and untracked ones git does not
    ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    files = (root / name for name in out.decode().split("\0") if name)
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def check(dest: Path, root: Path = ROOT) -> tuple[float, list[str]]:
    """(MiB that would travel, problems): every pinned wheel present once, nothing else, the total under 64 MiB."""
    wheels = sorted(dest.glob("*.whl"))
    names = [project_name(w) for w in wheels]
    problems = [f"missing: {spec}" for spec in WHEELS if spec.split("==")[0] not in names]
    problems += [f"more than one wheel of {n}" for n in sorted(set(names)) if names.count(n) > 1]
    total = (travelling_tree_bytes(root) + sum(w.stat().st_size for w in wheels)) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    print(f"{total:7.1f} MiB  in all with the working tree (budget {BUDGET_MIB:.0f} MiB a call)")
    if total > BUDGET_MIB:
        problems.append(f"{total:.1f} MiB would travel, over the device tool's {BUDGET_MIB:.0f} MiB")
    return total, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--check", action="store_true", help="only check what is in --dest")
    args = parser.parse_args()
    if not args.check:
        download(args.dest)
    _, problems = check(args.dest)
    for problem in problems:
        print(f"gpu-wheels: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
