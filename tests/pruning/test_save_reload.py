"""Pruned (and pruned + quantized) models through both doors, saved and reloaded in a fresh process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_vram
from hf_vram.pruning import BlockSparseLinear, sparsity_report
from hf_vram.pruning.sites import attention_sites
from tests.tiny_models import AUTO_CLASS, TINY_ARCHS, sample_ids

ROOT = Path(__file__).resolve().parents[2]
PRUNE = {"enabled": True, "head_ratio": 0.5, "mlp_ratio": 0.25, "method": "magnitude"}


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(sample_ids()).logits


def _fresh_reload(jobs: list[tuple[str, Path]], tmp_path: Path) -> list[dict]:
    """Reload each (arch, saved folder) in one fresh Python process; its tensors and logits, in order."""
    args, dumps = [], []
    for i, (arch, saved) in enumerate(jobs):
        dumps.append(tmp_path / f"dump{i}.safetensors")
        args += [arch, str(saved), str(dumps[-1])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "tests.integration.reload_worker", *args], check=True, cwd=ROOT, env=env, capture_output=True
    )
    return [load_file(d) for d in dumps]


QUANTIZATIONS = {"float": {"scheme": "none"}, "int8": {"scheme": "int8"}, "int4": {"scheme": "int4", "group_size": 32}}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_both_doors_then_fresh_process_reload(arch, tiny_dirs, tmp_path):
    """Pruned float, pruned + int8 and pruned + int4: from_pretrained == optimize, and a fresh reload is identical."""
    expected, jobs = [], []
    for name, quantization in QUANTIZATIONS.items():
        cfg = hf_vram.VramOptimizationConfig(pruning=PRUNE, quantization=quantization)
        loaded = AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch], quantization_config=copy.deepcopy(cfg)).eval()
        optimized = hf_vram.optimize(AUTO_CLASS[arch].from_pretrained(tiny_dirs[arch]).eval(), copy.deepcopy(cfg))
        assert loaded.config.quantization_config.pruning.plan == optimized.config.quantization_config.pruning.plan
        sd = loaded.state_dict()
        assert sorted(sd) == sorted(optimized.state_dict())
        for key, value in optimized.state_dict().items():
            assert torch.equal(sd[key], value), (name, key)
        logits = _logits(loaded)
        assert torch.equal(_logits(optimized), logits)
        saved = tmp_path / name
        loaded.save_pretrained(saved)
        stored = json.loads((saved / "config.json").read_text())["quantization_config"]
        assert stored["pruning"]["enabled"] and stored["state"]["pruning_plan"]["heads"]
        expected.append((name, sd, logits))
        jobs.append((arch, saved))
    for (name, sd, logits), fresh in zip(expected, _fresh_reload(jobs, tmp_path), strict=True):
        assert torch.equal(fresh["logits"], logits), name
        for key, value in sd.items():
            assert torch.equal(fresh[f"sd.{key}"], value), (name, key)


def test_saved_pruned_model_is_smaller_on_disk(tiny_dirs, tmp_path):
    cfg = hf_vram.VramOptimizationConfig(pruning=PRUNE)
    model = AUTO_CLASS["llama"].from_pretrained(tiny_dirs["llama"], quantization_config=cfg)
    model.save_pretrained(tmp_path / "pruned")
    assert (tmp_path / "pruned" / "model.safetensors").stat().st_size < (tiny_dirs["llama"] / "model.safetensors").stat().st_size
    assert sum(s.num_heads for s in attention_sites(model)) == 4


def test_block_sparse_saves_bytes_and_reloads(tiny_dirs, tmp_path):
    cfg = hf_vram.VramOptimizationConfig(pruning={"enabled": True, "sparsity": "block16", "sparsity_ratio": 0.5})
    model = AUTO_CLASS["llama"].from_pretrained(tiny_dirs["llama"], quantization_config=cfg).eval()
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert layers
    report = sparsity_report(model)
    assert report["bytes_saved"] > 0.4 * report["dense_equivalent_bytes"]
    # The sparse layer computes exactly the dense product with the dropped blocks zeroed.
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, atol=1e-5, rtol=1e-5)
    logits = _logits(model)
    model.save_pretrained(tmp_path / "sparse")
    (fresh,) = _fresh_reload([("llama", tmp_path / "sparse")], tmp_path)
    assert torch.equal(fresh["logits"], logits)


def test_unstructured_sparsity_is_reported_as_saving_nothing(tiny_dirs):
    cfg = hf_vram.VramOptimizationConfig(pruning={"enabled": True, "sparsity": "unstructured", "sparsity_ratio": 0.5})
    model = AUTO_CLASS["llama"].from_pretrained(tiny_dirs["llama"], quantization_config=cfg)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert 0.45 < (weight == 0).float().mean().item() < 0.55
    assert sparsity_report(model)["bytes_saved"] == 0
    assert weight.numel() == 64 * 96  # still dense
