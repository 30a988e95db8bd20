"""``hf-vram serve``: Transformers' OpenAI-compatible server in a process with hf_vram, driven by the ``openai``
client over 127.0.0.1 only (bounded: a few requests, each with a timeout), on SmolLM2 with int8 weights."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import smollm2_path
from hf_vram.serving import apply_kv_overrides, kv_overrides, serve
from tests.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is a generator?"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """SmolLM2 with int8 weights, saved by hf_vram with its tokenizer (what a user serves)."""
    out = tmp_path_factory.mktemp("served") / "smollm2-int8"
    config = hf_vram.VramOptimizationConfig.from_preset("int8")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32, quantization_config=config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(saved):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hf_vram.cli", "serve", str(saved), "--continuous-batching", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--device", "cpu", "--host", "127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the server did not answer /health within 240 s")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _greedy(saved: Path, ids: torch.Tensor, new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_chat_completions_and_streaming_give_generates_greedy_text(server, saved):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    chat_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    chat_ids = chat_ids if isinstance(chat_ids, torch.Tensor) else chat_ids["input_ids"]
    expected_chat = _greedy(saved, chat_ids, 16)

    reply = client.chat.completions.create(model=str(saved), messages=QUESTION, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == expected_chat
    stream = client.chat.completions.create(model=str(saved), messages=QUESTION, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_chat

    prompt = "def fibonacci(n):"
    completion = client.completions.create(model=str(saved), prompt=prompt, max_tokens=12, temperature=0)
    assert completion.choices[0].text == _greedy(saved, tokenizer(prompt, return_tensors="pt").input_ids, 12)

    with urllib.request.urlopen(server + "/metrics", timeout=10) as reply:  # the admission layer counted them
        metrics = reply.read().decode()
    assert 'hf_vram_requests_total{outcome="completed",tenant="default"} 3.0' in metrics


def test_kv_flags_set_the_models_kv_section_and_refuse_what_they_cannot_hold():
    model = hf_vram.optimize(build_tiny("llama").float(), {"quantization": {"scheme": "int8"}})
    apply_kv_overrides(model, kv_overrides(4, "32MiB"))
    section = model.config.quantization_config.kv_cache
    assert (section.dtype, section.max_memory, section.enabled) == ("int4", 32 * 2**20, False)
    with pytest.raises(ValueError, match="--preset"):
        apply_kv_overrides(build_tiny("llama"), kv_overrides(8, None))
    with pytest.raises(ValueError, match="8, 4 or 2"):
        kv_overrides(3, None)
    with pytest.raises(ValueError, match="max_memory"):
        kv_overrides(None, "lots")


def test_a_preset_on_a_checkpoint_hf_vram_saved_is_refused(saved):
    with pytest.raises(ValueError, match="already holds its optimization"):
        serve(str(saved), [], config=hf_vram.VramOptimizationConfig.from_preset("int4"))
