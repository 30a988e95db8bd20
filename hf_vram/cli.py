"""``hf-vram``: command-line door to hf_vram, on top of the public names.

    hf-vram optimize [--preset int8] [--model PATH] [--tokens 4096] [--save DIR]
    hf-vram report DIR

``optimize`` loads the model (the bundled SmolLM2-135M-Instruct by default), measures memory and perplexity on
CPython's pydoc text, applies the preset through ``from_pretrained(..., quantization_config=...)``, measures
again and prints both side by side. Exit codes: 0 ok, 2 bad arguments or config, 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time


def _load(path, config=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def cmd_optimize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    import hf_vram
    from hf_vram.assets import pydoc_text, smollm2_path
    from hf_vram.evaluation import perplexity, token_stream

    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = (
        hf_vram.VramOptimizationConfig.from_yaml(args.config)
        if args.config
        else hf_vram.VramOptimizationConfig.from_preset(args.preset)
    )
    path = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tokenizer, pydoc_text(), args.tokens)

    rows = []
    for label, cfg in (("float32", None), (args.config or args.preset, config)):
        t0 = time.perf_counter()
        model = _load(path, cfg)
        load_s = time.perf_counter() - t0
        report = hf_vram.memory_report(model)
        ppl = perplexity(model, ids)
        rows.append((label, report.total / 2**20, ppl, load_s))
        print(f"\n{label}: memory by kind\n{report.table()}", flush=True)
    base = rows[0]
    print(f"\nSmolLM2 weights and perplexity ({args.tokens} tokens of pydoc text, 512-token windows)")
    print(f"{'config':<12} {'MiB':>8} {'x float':>8} {'ppl':>8} {'ppl vs float':>13} {'load s':>7}")
    for label, mib, ppl, load_s in rows:
        print(f"{label:<12} {mib:8.1f} {mib / base[1]:8.3f} {ppl:8.3f} {100 * (ppl / base[2] - 1):+12.2f}% {load_s:7.1f}")
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        print(f"\nsaved to {args.save}; load it with `import hf_vram` then `from_pretrained({args.save!r})`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import hf_vram

    model = _load(args.path)
    print(hf_vram.memory_report(model).table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vram", description="Cut the memory a Transformers model needs.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="load, apply a preset, compare memory and perplexity, optionally save")
    opt.add_argument("--preset", default="int8", help="a preset in configs/ (default: int8)")
    opt.add_argument("--config", default=None, help="a YAML config file instead of a preset")
    opt.add_argument("--model", default=None, help="a local model folder (default: bundled SmolLM2-135M-Instruct)")
    opt.add_argument("--tokens", type=int, default=4096, help="tokens of pydoc text for perplexity (multiple of 512)")
    opt.add_argument("--save", default=None, help="save the optimized model to this folder")
    opt.set_defaults(func=cmd_optimize)
    rep = sub.add_parser("report", help="memory breakdown of a saved model")
    rep.add_argument("path")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"hf-vram: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
