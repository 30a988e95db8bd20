"""The model card of an exported compressed-tensors folder: what it holds, how to serve and evaluate it, and what
the export changed or left behind."""

from __future__ import annotations


def _schemes_text(config: dict) -> str:
    groups = config["quantization_config"]["config_groups"]
    return "; ".join(
        f"{len(g['targets'])} layers {g['weights']['num_bits']}-bit {g['weights']['strategy']}"
        + (f" {g['weights']['group_size']}" if g["weights"].get("group_size") else "")
        + (" symmetric" if g["weights"]["symmetric"] else " asymmetric")
        + (", int8 activations per token" if g.get("input_activations") else "")
        for g in groups.values()
    )


def model_card(name: str, config: dict, notes: list[str]) -> str:
    """README.md text for the folder ``name`` holding the compressed-tensors ``config`` (config.json as a dict)."""
    changes = "\n".join(f"- {n}" for n in notes) or "- nothing: every tensor crossed over as it was."
    return f"""---
library_name: transformers
tags: [compressed-tensors, quantized, hf_vram]
---
# {name}: exported by hf_vram to compressed-tensors

Weights: {_schemes_text(config)}; codes and scales as hf_vram computed them (no float round trip).
Loads without hf_vram: Transformers reads compressed-tensors (`pip install compressed-tensors`), and so do vLLM and
SGLang.

```bash
vllm serve ./{name}                 # OpenAI-compatible server; add --tensor-parallel-size N for N GPUs
lm_eval --model hf --model_args pretrained=./{name} --tasks hellaswag,arc_easy
lm_eval --model vllm --model_args pretrained=./{name} --tasks hellaswag,arc_easy
```

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("./{name}")
```

## What the export changed or left behind
{changes}

To use hf_vram's own kernels, KV pool and fused attention again: `model = AutoModelForCausalLM.from_pretrained(...)`,
then `hf_vram.optimize(model, config)` converts the compressed layers back into hf_vram's, bit for bit.
"""
