"""Optimize a model that is already in memory: SmolLM2 straight from its GGUF file, then ``hf_vram.optimize``.

For models that do not come through ``from_pretrained(..., quantization_config=...)`` (a GGUF file, a model you
just fine-tuned): ``hf_vram.optimize(model, config)`` applies the same stages in place, and the result saves and
reloads exactly like one loaded with the config.
Run: python examples/optimize_in_memory.py [preset]   (default: int4)
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import pydoc_text, smollm2_gguf_path


def main(preset: str = "int4") -> None:
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("hf_quantizer", "quantization_method"):  # the GGUF reader leaves a marker: the weights are float now
        if hasattr(model, attr):
            delattr(model, attr)
    before = hf_vram.memory_report(model).total

    # Calibration text for presets that use it (AWQ-style int4 scales, Taylor pruning): your own texts work too.
    calibration = hf_vram.calibration_ids(tokenizer, pydoc_text(), n_windows=8, window=512, from_end=True)
    hf_vram.optimize(model, preset, calibration)  # in place
    after = hf_vram.memory_report(model)
    print(after.table())
    print(f"{preset}: {before / 2**20:.1f} MiB -> {after.total / 2**20:.1f} MiB")

    prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    print(tokenizer.decode(out[0, prompt.shape[1] :]))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder)
        same = torch.equal(again.generate(prompt, max_new_tokens=24, do_sample=False), out)
    print(f"saved and reloaded: identical generation = {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main(*sys.argv[1:2])
