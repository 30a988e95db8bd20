"""Fit SmolLM2 into a memory budget: estimate first (nothing loaded), then let the planner choose the config.

``hf_vram.estimate`` sizes a config on the meta device; ``VramOptimizationConfig(target_memory=...)`` measures
each layer's sensitivity on calibration text and picks per-layer int8/int4 (and pruning, only when needed) so the
model fits with the least loss; it prints its plan with the estimated and measured loss.
Run: python examples/fit_budget.py [--budget 100MB]
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM

import hf_vram
from hf_vram.assets import smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="100MB")
    args = parser.parse_args()
    path = smollm2_path()
    for preset in ("int8", "int4"):
        estimate = hf_vram.estimate(path, preset, batch=1, seq_len=2048)
        print(
            f"{preset}: {estimate.weights_bytes / 2**20:.1f} MiB of weights, "
            f"{estimate.kv_cache_bytes / 2**20:.1f} MiB of KV cache for 2048 tokens (estimated before loading)"
        )

    config = hf_vram.VramOptimizationConfig(target_memory=args.budget)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)  # prints the plan
    measured = hf_vram.memory_report(model).total
    print(
        f"budget {config.target_memory / 2**20:.1f} MiB, model {measured / 2**20:.1f} MiB: "
        f"{'fits' if measured <= config.target_memory else 'DOES NOT FIT'}"
    )
    if measured > config.target_memory:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
