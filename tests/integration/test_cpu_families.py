"""Saved hf_vram models reload and run in float32 and bfloat16 on every torch CPU path this machine can take.

The project's machines are AMD EPYC (AVX2) or Intel Xeon (AVX-512, AMX): torch runs different kernels on each, and
one of them crashed on inputs the other accepts (misaligned int8 weights from a memory-mapped checkpoint). Each
reachable path (``ATEN_CPU_CAPABILITY``: default, avx2, and avx512 where the CPU has it) reloads every saved model in
a fresh process: a float32 load's forward, a ``dtype=torch.bfloat16`` load's forward and greedy generate, and
``model.to(torch.bfloat16)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_vram
from hf_vram.kernels.cpu_caps import cpu_family, reachable_capabilities, torch_capability
from tests.tiny_models import AUTO_CLASS, TINY_ARCHS, sample_ids

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = {
    "int8": {"scheme": "int8", "quantize_embeddings": True},
    "int4": {"scheme": "int4", "group_size": 32, "quantize_embeddings": True},
    "w8a8": {"scheme": "w8a8", "quantize_embeddings": True},
}
# Stated tolerances (relative L2 error of the logits): float32 on another CPU path differs only by the kernels'
# rounding (bfloat16 activations in the packed decode kernels); bfloat16 models differ from float32 by bf16 rounding
# of every activation.
FP32_ACROSS_PATHS = 1e-2
BF16_VS_FP32 = 6e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def saved_models(tiny_dirs, tmp_path_factory):
    """{folder name: (arch, folder, float32 logits in this process)} for 9 families x 3 schemes, embedding int8."""
    root = tmp_path_factory.mktemp("families")
    saved = {}
    for arch in TINY_ARCHS:
        for scheme, section in SCHEMES.items():
            model = (
                AUTO_CLASS[arch]
                .from_pretrained(tiny_dirs[arch], quantization_config=hf_vram.VramOptimizationConfig(quantization=section))
                .eval()
            )
            folder = root / f"{arch}-{scheme}"
            model.save_pretrained(folder)
            with torch.inference_mode():
                saved[folder.name] = (arch, folder, model(sample_ids()).logits)
    return saved


def test_capabilities_this_machine_reaches_include_its_own():
    caps = reachable_capabilities()
    assert caps[0] == "default" and torch_capability() in caps
    assert cpu_family().split("-")[0] == caps[-1]


@pytest.mark.parametrize("capability", reachable_capabilities())
def test_saved_models_reload_in_float32_and_bfloat16_on_each_cpu_path(capability, saved_models, tmp_path):
    dump = tmp_path / "dump.safetensors"
    pairs = [f"{arch}:{folder}" for arch, folder, _ in saved_models.values()]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.dtype_worker", str(dump), *pairs],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ATEN_CPU_CAPABILITY": capability},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"worker on the {capability} path exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    got = load_file(dump)
    assert bytes(got["capability"].tolist()).decode().lower() == capability
    problems = []
    for name, (arch, _, reference) in saved_models.items():
        fp32, bf16, to_bf16 = got[f"{name}.fp32"], got[f"{name}.bf16_load"], got[f"{name}.to_bf16"]
        if capability == torch_capability() and not torch.equal(fp32, reference):
            problems.append(f"{name}: float32 reload differs from the saved model on the same path")
        if _rel(fp32, reference) > FP32_ACROSS_PATHS:
            problems.append(f"{name}: float32 error {_rel(fp32, reference):.1e} on the {capability} path")
        for label, logits in (("dtype=bfloat16 load", bf16), ("model.to(bfloat16)", to_bf16)):
            if logits.dtype != torch.bfloat16 or not torch.isfinite(logits).all():
                problems.append(f"{name}: {label} gave {logits.dtype} logits, finite={bool(torch.isfinite(logits).all())}")
            elif _rel(logits, reference) > BF16_VS_FP32:
                problems.append(f"{name}: {label} error {_rel(logits, reference):.1e} against float32")
        if arch != "bert":
            tokens = got[f"{name}.bf16_generate"]
            if tokens.shape != (2, 4) or not ((tokens >= 0) & (tokens < 320)).all():
                problems.append(f"{name}: bfloat16 greedy generate gave {tuple(tokens.shape)} tokens {tokens.tolist()}")
    assert not problems, "\n".join(problems)


def test_to_bfloat16_keeps_the_saved_scales_exact(saved_models):
    """``model.to(dtype)`` casts outputs and biases, never the quantization scales (or a re-save would differ)."""
    arch, folder, _ = saved_models["llama-int8"]
    model = AUTO_CLASS[arch].from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("scales", "scales_zeros", "act_scales"))}
    model.to(torch.bfloat16)
    after = model.state_dict()
    assert before and all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert model.get_input_embeddings().out_dtype == torch.bfloat16
    model.to(torch.float32)
    assert model.get_input_embeddings().out_dtype == torch.float32
