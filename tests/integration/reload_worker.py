"""Run in a fresh Python process: load a saved hf_vram model and dump its tensors and logits."""

import sys

import torch
from safetensors.torch import save_file

import hf_vram  # noqa: F401  (registers the quantization method)
from tests.tiny_models import AUTO_CLASS, sample_ids


def main(arch: str, saved: str, out: str) -> None:
    model = AUTO_CLASS[arch].from_pretrained(saved)
    tensors = {f"sd.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        tensors["logits"] = model(sample_ids()).logits.contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    args = sys.argv[1:]  # one or more (arch, saved, out) triples, so one process can check several saves
    for i in range(0, len(args), 3):
        main(*args[i : i + 3])
