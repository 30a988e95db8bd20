"""``hf-vram serve --adapter``: a LoRA adapter trained on a compressed model goes into the model the server loads,
unmerged (a merge re-quantizes, and the int4 grid takes back what a short recovery run won)."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.cli.serving import model_manager
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import hf_vram
from hf_vram.cli import main
from hf_vram.quant.linear import QuantLinear
from hf_vram.recovery import QuantLoraLinear, add_lora, load_lora_adapter
from hf_vram.serving import loader, serve, server
from hf_vram.serving.server import install, spawns_model_processes
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


def served_model(path: str, monkeypatch, *install_args):
    """The model Transformers' server loads for ``path`` after ``install(*install_args)``: through its model manager
    (5.24), or through the loader its model's process gets (5.25: unpickled there, as here)."""
    for owner, name in ((model_manager.ModelManager, "_load_model"), (model_manager.ModelManager, "get_quantization_config")):
        if hasattr(owner, name):  # install wraps them: put the originals back afterwards
            monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(loader, "SETTINGS", loader.SETTINGS)
    if hasattr(model_manager, "ModelLoader"):
        monkeypatch.setattr(model_manager, "ModelLoader", model_manager.ModelLoader)
    install(*install_args)
    if not spawns_model_processes():
        return model_manager.ModelManager(device="cpu", dtype="float32")._load_model(path)
    model_loader = pickle.loads(pickle.dumps(model_manager.ModelLoader(device="cpu", dtype="float32")))
    return model_loader._load_model(path)


def test_the_server_loads_the_model_with_the_adapter_in_its_layers(compressed_and_adapter, monkeypatch):
    compressed, adapter = compressed_and_adapter
    served = served_model(str(compressed), monkeypatch, None, {}, str(adapter))
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


def test_a_plain_checkpoint_is_optimized_and_given_its_kv_fields_where_the_server_loads_it(tiny_dirs, monkeypatch):
    """``--preset`` and ``--kv-bits`` reach the model on either server: in its process (5.24), or in the model's
    own (5.25), whose loader carries them pickled."""
    config = hf_vram.VramOptimizationConfig(quantization={"scheme": "int4", "group_size": 32})
    served = served_model(str(tiny_dirs["llama"]), monkeypatch, config, {"dtype": "int2", "max_memory": 2**20})
    assert sum(isinstance(m, QuantLinear) for m in served.modules()) == 14  # 2 layers x 7 projections, int4
    section = served.config.quantization_config.kv_cache
    assert (section.dtype, section.max_memory) == ("int2", 2**20)
    assert config.kv_cache.dtype != "int2"  # the server's copy, not the caller's config


def test_a_model_process_publishes_its_pool_for_the_servers_metrics(tmp_path, monkeypatch):
    """On 5.25 the K/V pool lives in the model's process: it writes its blocks to a file the server's /metrics
    reads; a process that stopped no longer counts."""
    pool = loader.PoolFile(str(tmp_path))
    monkeypatch.setattr(loader, "pool_blocks", lambda: (3, 5))
    monkeypatch.setattr(loader, "PUBLISH_SECONDS", 0.01)
    stop = pool.publish_forever()
    try:
        deadline = time.monotonic() + 10
        while pool.blocks() != (3, 5) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.blocks() == (3, 5)
        (tmp_path / "999999999").write_text("7 7")  # a process id no process has
        assert pool.blocks() == (3, 5)
        metrics = server.ServerMetrics(pool=pool.blocks).text().decode()
        assert "hf_vram_kv_pool_blocks_held 3.0" in metrics and "hf_vram_kv_pool_blocks_free 5.0" in metrics
    finally:
        stop.set()


def test_the_publishing_thread_ends_when_stopped_or_when_the_server_removed_its_directory(tmp_path, monkeypatch):
    """A publisher outliving its server (which removes the directory as it stops) ends quietly instead of raising
    in its thread every tick; one told to stop ends too."""
    monkeypatch.setattr(loader, "pool_blocks", lambda: (1, 2))
    monkeypatch.setattr(loader, "PUBLISH_SECONDS", 0.01)
    before = {t for t in threading.enumerate() if t.name == "hf_vram-pool"}
    directory = tmp_path / "pool"
    directory.mkdir()
    loader.PoolFile(str(directory)).publish_forever()
    stop = loader.PoolFile(str(tmp_path)).publish_forever()
    ours = {t for t in threading.enumerate() if t.name == "hf_vram-pool"} - before
    assert len(ours) == 2
    directory.rename(tmp_path / "removed")  # gone from where the publisher writes, at once (no race with its writes)
    stop.set()
    for thread in ours:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_a_server_whose_loading_hf_vram_cannot_reach_is_refused_by_name(compressed_and_adapter, monkeypatch):
    """A Transformers that loads served models in processes of their own through no loader hf_vram knows: refused
    before anything loads, naming the versions to install, rather than served unoptimized; several API servers
    (each its own process, outside admission) too."""
    compressed, adapter = compressed_and_adapter
    monkeypatch.setattr(server, "spawns_model_processes", lambda: True)
    monkeypatch.setattr(loader, "HfVramModelLoader", None)
    with pytest.raises(RuntimeError, match=r"does not reach them.*pip install 'transformers\[serving\]>=5.24,<5.26'"):
        serve(str(compressed), [], adapter=str(adapter))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--api-server-count 2 .* leave it out"):
        serve(str(compressed), ["--api-server-count", "2"])
