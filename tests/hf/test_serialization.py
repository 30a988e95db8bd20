"""What save_pretrained writes, what push_to_hub would upload, and refusals of damaged checkpoints (loading without
`import hf_vram`: tests/hf/test_checkpoint_type.py and tests/reliability/test_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.hf.integrity import write_manifest
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def saved_int8(tmp_path):
    model = hf_vram.optimize(build_tiny("llama"), {"quantization": {"scheme": "int8", "quantize_embeddings": True}})
    out = tmp_path / "int8"
    model.save_pretrained(out)
    return model, out


def test_saved_folder_is_safetensors_with_full_config(saved_int8):
    model, out = saved_int8
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert stored == model.config.quantization_config.to_dict()
    assert stored["quant_method"] == "hf_vram" and stored["quantization"]["scheme"] == "int8"
    card = (out / "README.md").read_text()
    assert "import hf_vram" in card and "int8" in card


def test_push_to_hub_uploads_exactly_the_saved_folder(saved_int8, tmp_path, monkeypatch):
    model, out = saved_int8
    uploaded = {}

    def fake_commit(self, *, repo_id, operations, **kwargs):  # only the network boundary is replaced
        for op in operations:
            uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return "fake-commit"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: type("R", (), {"repo_id": "me/x"})())
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_commit)
    try:
        model.push_to_hub("me/x", token="fake")
    except Exception as err:  # pragma: no cover - shows what transformers called instead
        pytest.fail(f"push_to_hub reached the network boundary differently: {err!r}")
    expected = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert uploaded.keys() == expected.keys()
    assert uploaded["model.safetensors"] == expected["model.safetensors"]
    assert (
        json.loads(uploaded["config.json"])["quantization_config"] == json.loads(expected["config.json"])["quantization_config"]
    )


def test_checkpoint_missing_a_tensor_is_refused(saved_int8, tmp_path):
    from safetensors.torch import load_file, save_file

    _, out = saved_int8
    tensors = load_file(out / "model.safetensors")
    victim = next(k for k in tensors if k.endswith("q_proj.scales"))
    del tensors[victim]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_manifest(out)  # a consistent-looking folder: the content check itself must catch it
    with pytest.raises(ValueError, match="does not match its saved hf_vram config"):
        AutoModelForCausalLM.from_pretrained(out)


def test_checkpoint_with_wrong_shape_is_refused(saved_int8):
    from safetensors.torch import load_file, save_file

    _, out = saved_int8
    tensors = load_file(out / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.qweight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_manifest(out)
    with pytest.raises((RuntimeError, ValueError), match="(?i)size|shape|mismatch"):
        AutoModelForCausalLM.from_pretrained(out)


def test_unknown_skip_pattern_is_a_clear_error(tmp_path):
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="matches no module"):
        hf_vram.optimize(model, {"quantization": {"scheme": "int8", "modules_to_not_convert": ["mlpp"]}})


def test_skip_patterns_match_names_suffixes_and_regexes():
    model = build_tiny("llama")
    cfg = {
        "quantization": {
            "scheme": "int8",
            "modules_to_not_convert": ["down_proj", r"model\.layers\.1\..*", "model.layers.0.self_attn.q_proj"],
        }
    }
    hf_vram.optimize(model, cfg)
    plan = model.hf_quantizer.plan
    assert plan.pattern_matches["down_proj"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert plan.skipped["model.layers.0.self_attn.q_proj"] == "modules_to_not_convert"
    layer0, layer1 = model.model.layers
    assert type(layer0.mlp.down_proj) is torch.nn.Linear and type(layer0.self_attn.q_proj) is torch.nn.Linear
    assert type(layer0.self_attn.k_proj).__name__ == "Int8Linear"
    assert all(type(m) is torch.nn.Linear for m in layer1.modules() if isinstance(m, torch.nn.Linear))


def test_quantizing_into_disk_offload_is_refused(tiny_dirs, tmp_path):
    cfg = hf_vram.VramOptimizationConfig(quantization={"scheme": "int8"})
    with pytest.raises(ValueError, match="offloading to disk"):
        AutoModelForCausalLM.from_pretrained(
            tiny_dirs["llama"], quantization_config=cfg, device_map={"": "disk"}, offload_folder=str(tmp_path)
        )


KILLED_SAVE = """
import os, signal, sys
import transformers.modeling_utils as mu
import hf_vram
from tests.tiny_models import build_tiny

def dying_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies in the middle of writing the weights

model = hf_vram.optimize(build_tiny("llama", seed=1), {"quantization": {"scheme": "int4", "group_size": 32}})
mu.safe_save_file = dying_save
model.save_pretrained(sys.argv[1])
"""


def test_interrupted_save_leaves_previous_checkpoint_loadable(saved_int8):
    model, out = saved_int8
    before = (out / "model.safetensors").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(out)], cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == -9  # killed, as planned
    assert (out / "model.safetensors").read_bytes() == before
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 320, (1, 8))
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)
