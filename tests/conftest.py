"""Shared fixtures: tiny random models of many families, the real SmolLM2, real text. No network."""

from __future__ import annotations

import os

# Triton kernels run on the CPU under the interpreter (must be set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: with two xdist workers (`make test` runs `-n 2`) each gets one thread instead of both fighting over two,
# and so does every process a test starts (notebook kernels, reload workers): OpenMP threads that outnumber the
# cores spin against each other, which slowed a notebook cell twentyfold under a second CPU-heavy job.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

from tests.tiny_models import TINY_ARCHS, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Each tiny architecture saved once as a float checkpoint: {arch: path}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in TINY_ARCHS:
        model = build_tiny(arch)
        path = root / arch
        model.save_pretrained(path)
        out[arch] = path
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    from hf_vram.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def pydoc_ids(smollm2):
    from hf_vram.assets import pydoc_text
    from hf_vram.evaluation import token_stream

    return token_stream(smollm2[1], pydoc_text(), 2048)
