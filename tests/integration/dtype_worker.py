"""Run in a fresh process (on one torch CPU path): reload saved hf_vram models in float32 and bfloat16, forward and
generate, and dump the logits and tokens for ``test_cpu_families.py`` to compare.

    python -m tests.integration.dtype_worker OUT.safetensors ARCH:FOLDER [ARCH:FOLDER ...]
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

import hf_vram  # noqa: F401  (registers the quantization method)
from tests.tiny_models import AUTO_CLASS, sample_ids


def run(arch: str, folder: str) -> dict[str, torch.Tensor]:
    ids = sample_ids()
    out = {}
    with torch.inference_mode():
        fp32 = AUTO_CLASS[arch].from_pretrained(folder).eval()
        out["fp32"] = fp32(ids).logits.contiguous()
        bf16 = AUTO_CLASS[arch].from_pretrained(folder, dtype=torch.bfloat16).eval()
        out["bf16_load"] = bf16(ids).logits.contiguous()
        out["to_bf16"] = fp32.to(torch.bfloat16)(ids).logits.contiguous()
        if arch != "bert":
            tokens = bf16.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
            out["bf16_generate"] = tokens[:, ids.shape[1] :].contiguous()
    return out


def main(target: str, pairs: list[str]) -> None:
    tensors = {}
    for pair in pairs:
        arch, _, folder = pair.partition(":")
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        tensors.update({f"{name}.{k}": v for k, v in run(arch, folder).items()})
    tensors["capability"] = torch.tensor([ord(c) for c in torch.backends.cpu.get_cpu_capability()])
    save_file(tensors, target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
