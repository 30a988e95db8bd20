"""``hf-vram serve --adapter``: a LoRA adapter trained on a compressed model goes into the model the server loads,
unmerged (a merge re-quantizes, and the int4 grid takes back what a short recovery run won)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.cli.serving.model_manager import ModelManager
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import hf_vram
from hf_vram.cli import main
from hf_vram.recovery import QuantLoraLinear, add_lora, load_lora_adapter
from hf_vram.serving import serve
from hf_vram.serving.server import install
from tests.tiny_models import sample_ids


@pytest.fixture
def compressed_and_adapter(tiny_dirs, tmp_path):
    """A tiny Llama with int4 weights saved by hf_vram, and a LoRA adapter on it with a nonzero update."""
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int4", "group_size": 32})
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "compressed")
    torch.manual_seed(0)
    add_lora(model, r=4, lora_alpha=8, init_lora_weights=False).save_pretrained(tmp_path / "adapter")
    return tmp_path / "compressed", tmp_path / "adapter"


def test_the_server_loads_the_model_with_the_adapter_in_its_layers(compressed_and_adapter, monkeypatch):
    compressed, adapter = compressed_and_adapter
    for seam in ("_load_model", "get_quantization_config"):  # install wraps them: put the originals back afterwards
        monkeypatch.setattr(ModelManager, seam, getattr(ModelManager, seam))
    install(None, {}, str(adapter))
    served = ModelManager(device="cpu", dtype="float32")._load_model(str(compressed))
    assert sum(isinstance(m, QuantLoraLinear) for m in served.modules()) == 14  # 2 layers x 7 projections
    assert not served.training

    reference = load_lora_adapter(AutoModelForCausalLM.from_pretrained(compressed), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(compressed).eval()
    ids = sample_ids()
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (served, reference, base))
    assert torch.equal(got, want)
    assert (want - plain).abs().mean() > 1e-3  # the adapter changes the answer: the test would see it missing

    # what the server runs: continuous batching over the adapted layers, greedy equal to generate
    prompts = [ids[0].tolist(), ids[1, :7].tolist()]
    generation = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=64, max_batch_tokens=64)
    out = served.generate_batch(prompts, generation_config=generation, continuous_batching_config=cb)
    expected = [reference.generate(torch.tensor([p]), generation_config=generation)[0, len(p) :].tolist() for p in prompts]
    assert [o.generated_tokens for o in out.values()] == expected


def test_a_folder_without_an_adapter_is_refused_before_the_server_starts(compressed_and_adapter, capsys):
    compressed, _ = compressed_and_adapter
    with pytest.raises(ValueError, match="--adapter .* has no adapter_config.json.*save_pretrained"):
        serve(str(compressed), [], adapter=str(compressed))
    assert main(["serve", str(compressed), "--adapter", str(compressed)]) == 2  # the command line's way in
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_a_transformers_that_serves_from_a_spawned_process_is_refused_by_name(compressed_and_adapter, monkeypatch):
    """Transformers 5.25 loads the served model in a spawned process that hf_vram's seams do not reach: refused
    before anything loads, naming the version to install, rather than served unoptimized."""
    compressed, adapter = compressed_and_adapter
    monkeypatch.delattr(ModelManager, "_load_model")  # what 5.25's ModelManager looks like (loading moved out)
    with pytest.raises(RuntimeError, match=r"spawned process.*pip install 'transformers\[serving\]>=5.24,<5.25'"):
        serve(str(compressed), [], adapter=str(adapter))
