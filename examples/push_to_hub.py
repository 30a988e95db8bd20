"""Share an optimized model: ``push_to_hub`` uploads the weights, the hf_vram config and a model card.

The card (README.md) carries the config, the memory table, the measured quality (when recorded) and the
``import hf_vram`` line a user needs. ``--dry-run`` (the default without ``--repo``) writes the exact folder that
would be uploaded, for machines without Hub access.
Run: python examples/push_to_hub.py --repo you/SmolLM2-135M-hf_vram-int8     (needs `huggingface-cli login`)
     python examples/push_to_hub.py --dry-run --output out/to_upload
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_vram
from hf_vram.assets import pydoc_text, smollm2_path
from hf_vram.evaluation import perplexity, token_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=None, help="Hub repository id, e.g. you/model-int8")
    parser.add_argument("--preset", default="int8")
    parser.add_argument("--dry-run", action="store_true", help="write the upload folder instead of pushing")
    parser.add_argument("--output", default="out/to_upload")
    args = parser.parse_args()

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tokenizer, pydoc_text(), 1024)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=hf_vram.VramOptimizationConfig.from_preset(args.preset)
    ).eval()
    model.hf_vram_measurements = [  # recorded on the model, rendered into the card's quality table
        {
            "config": name,
            "MiB": hf_vram.memory_report(m).total / 2**20,
            "ppl": perplexity(m, ids),
            "text": "1024 tokens of CPython pydoc topics",
        }
        for name, m in (("float32", base), (args.preset, model))
    ]
    if args.repo and not args.dry_run:
        model.push_to_hub(args.repo)
        tokenizer.push_to_hub(args.repo)
        print(f"pushed: https://huggingface.co/{args.repo}")
        return
    model.save_pretrained(args.output)  # the same files push_to_hub uploads
    tokenizer.save_pretrained(args.output)
    print(f"dry run: the upload folder is {args.output}; its model card begins:\n")
    print("\n".join((open(f"{args.output}/README.md").read()).splitlines()[:12]))


if __name__ == "__main__":
    main()
