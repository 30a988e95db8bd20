"""llm-compressor's GPTQ W4A16 on SmolLM2, run inside llm-compressor's own virtual environment (it pins an older
Transformers). Called by ``benchmarks/quantization.py``; writes a compressed-tensors folder that the benchmark then
loads with hf_vram's Transformers to measure it exactly like every other row.

    python llmcompressor_gptq.py MODEL_DIR OUT_DIR --group 64 --symmetric {true,false} --windows ids.pt

``ids.pt`` holds the calibration windows ``[n, 512]`` chosen by the benchmark (disjoint from its evaluation tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--symmetric", choices=("true", "false"), default="true")
    parser.add_argument("--windows", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.windows)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": args.symmetric == "true", "strategy": "group", "group_size": args.group}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"], dampening_frac=0.01
    )
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    import llmcompressor
    import transformers

    print(
        "RESULT "
        + json.dumps(
            {"quantize_s": seconds, "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__}
        )
    )


if __name__ == "__main__":
    main()
