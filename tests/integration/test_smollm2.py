"""The real model: SmolLM2-135M-Instruct from the bundled GGUF, through both doors, save and fresh reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.evaluation import perplexity

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

RELOAD = """
import sys, torch, hf_vram
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    out = {"logits": m(ids).logits.contiguous()}
out.update({"sd." + k: v.clone().contiguous() for k, v in m.state_dict().items()})
save_file(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def float_ppl(smollm2, pydoc_ids):
    return perplexity(smollm2[0], pydoc_ids[:1024])


@pytest.mark.parametrize(
    "section,ppl_tol,mib_max",
    [
        ({"scheme": "int8", "quantize_embeddings": True}, 0.01, 140),
        ({"scheme": "int4", "group_size": 128, "quantize_embeddings": True, "scale_search": "none"}, 0.8, 95),
    ],
    ids=["int8", "int4-g128"],
)
def test_smollm2_quantized_load_reload(smollm2_dir, smollm2, pydoc_ids, float_ppl, section, ppl_tol, mib_max, tmp_path):
    cfg = hf_vram.VramOptimizationConfig(quantization=section)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg).eval()
    report = hf_vram.memory_report(model)
    assert report.total / 2**20 <= mib_max
    ppl = perplexity(model, pydoc_ids[:1024])
    assert ppl <= float_ppl * (1 + ppl_tol), (ppl, float_ppl)

    ids = pydoc_ids[:64].view(1, -1)
    with torch.inference_mode():
        logits = model(ids).logits
        float_logits = smollm2[0](ids).logits
    assert torch.isfinite(logits).all()
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0)
    assert cos > (0.999 if section["scheme"] == "int8" else 0.95)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    torch.save(ids, tmp_path / "ids.pt")
    dump = tmp_path / "dump.safetensors"
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(saved), str(tmp_path / "ids.pt"), str(dump)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    from safetensors.torch import load_file

    fresh = load_file(dump)
    assert torch.equal(fresh["logits"], logits)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh["sd." + key], value), key


def test_smollm2_optimize_in_memory_equals_load_path(smollm2_dir, smollm2):
    import copy

    cfg = hf_vram.VramOptimizationConfig.from_preset("int8")
    loaded = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg)
    optimized = hf_vram.optimize(copy.deepcopy(smollm2[0]), cfg)
    a, b = loaded.state_dict(), optimized.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_smollm2_int8_decode_path_agrees(smollm2_dir, smollm2, pydoc_ids):
    """Teacher-forced top-1 agrees with float, and the cached decode path (packed kernels) with the prefill path."""
    cfg = hf_vram.VramOptimizationConfig.from_preset("int8")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg).eval()
    ids = pydoc_ids[:256].view(1, -1)
    with torch.inference_mode():
        full = model(ids).logits[0]
        agree = (full.argmax(-1) == smollm2[0](ids).logits[0].argmax(-1)).float().mean().item()
        out = model(ids[:, :200], use_cache=True)
        cache = out.cache
        steps = []
        for i in range(200, 216):
            steps.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits[0, -1])
    assert agree >= 0.9
    decode = torch.stack(steps)
    assert ((decode - full[200:216]).norm() / full[200:216].norm()) < 0.02


EXPORT_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
ids = torch.load(sys.argv[2], weights_only=True)
kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if sys.argv[4] == "1" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, **kwargs)
with torch.inference_mode():
    torch.save(model(ids).logits, sys.argv[3])
assert "hf_vram" not in sys.modules
"""


@pytest.mark.parametrize(
    "config,tolerance",
    [
        (
            {
                "quantization": {
                    "scheme": "int4",
                    "group_size": 64,
                    "calibration": "awq",
                    "calibration_samples": 4,
                    "quantize_embeddings": True,
                    "compute_dtype": "float32",
                }
            },
            5e-3,
        ),
        ("w8a8", 5e-3),
    ],
    ids=["int4-g64-awq", "w8a8-preset"],
)
def test_smollm2_exports_to_compressed_tensors(smollm2, pydoc_ids, config, tolerance, tmp_path, monkeypatch):
    """AWQ scales folded into the norms and projections, so the exported model computes hf_vram's function; W8A8's
    activations compared with compressed-tensors' own per-token rounding (absmax / 127.5, see test_compressed_tensors)."""
    import copy

    from hf_vram.kernels import dispatch
    from tests.interop.test_compressed_tensors import _ct_w8a8

    model = copy.deepcopy(smollm2[0])
    cfg = (
        hf_vram.VramOptimizationConfig.from_preset(config)
        if isinstance(config, str)
        else hf_vram.VramOptimizationConfig(**config)
    )
    if isinstance(config, str):
        cfg.quantization.calibration_samples = 4
    hf_vram.optimize(model, cfg)
    assert model.config.quantization_config.state.act_scale_layers == []  # every scale folded: nothing the format cannot hold
    ids = pydoc_ids[:64].view(1, -1)
    monkeypatch.setattr(dispatch, "w8a8_linear", _ct_w8a8)
    with torch.inference_mode():
        reference = model(ids).logits
    report = hf_vram.export(model, tmp_path / "ct", tokenizer=smollm2[1])
    assert (tmp_path / "ct" / "tokenizer.json").is_file() and report.float_embedding_bytes > 0
    torch.save(ids, tmp_path / "ids.pt")
    asym = cfg.quantization.scheme == "int4" and not cfg.quantization.symmetric
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            EXPORT_CHECK,
            str(tmp_path / "ct"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
            "1" if asym else "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert ((plain - reference).norm() / reference.norm()) < tolerance
