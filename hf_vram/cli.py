"""``hf-vram``: the command-line door to hf_vram.

    hf-vram estimate  [--model DIR] [--preset P | --config YAML] [--batch B] [--seq-len S] [--prefill-chunk C]
    hf-vram optimize  [--model DIR] [--preset P | --config YAML | --target-memory SIZE] [--tokens N] [--save DIR]
                      [--push-to-hub REPO] [--compile]
    hf-vram bench     {quantization,kernel_speed,pruning,fusion,kvcache,recovery,planner} [-- script args]
    hf-vram report    DIR [--batch B --seq-len S]
    hf-vram export    DIR --out OUT [--format compressed-tensors] [--dtype bfloat16]

The model defaults to the bundled SmolLM2-135M-Instruct. Exit codes: 0 success; 2 bad arguments, config or input
(the message says what to change); 1 an unexpected failure (with its traceback).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import hf_vram
from hf_vram.assets import pydoc_text, smollm2_path
from hf_vram.evaluation import decode_rate, perplexity, token_stream
from hf_vram.presets import available_presets
from hf_vram.serving import AdmissionPolicy, serve
from hf_vram.serving.server import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED

BENCHMARKS = (
    "quantization",
    "kernel_speed",
    "pruning",
    "fusion",
    "kvcache",
    "recovery",
    "planner",
    "decode",
    "export",
    "import_time",
    "batching",
    "serve_load",
)
PRESETS = ", ".join(available_presets())
EPILOG = f"""examples:
  hf-vram estimate --preset int4 --batch 8 --seq-len 4096     what int4 needs for 8 x 4096 tokens, before loading
  hf-vram optimize --target-memory 100MB --save out/small     fit SmolLM2 into 100 MB, measure, save
  hf-vram optimize --preset serving --tokens 2048             int8 + fused attention + pooled KV on SmolLM2
  hf-vram optimize --preset int4 --compile                    int4, decode compiled (static cache), compile time shown
  hf-vram report out/small                                    memory breakdown of a saved model
  hf-vram export out/small --out out/small-ct                 compressed-tensors for vLLM / plain Transformers
  hf-vram bench pruning                                       re-run a benchmark and its results JSON
  hf-vram serve out/small --kv-bits 8 --continuous-batching   OpenAI API (transformers serve) with int8 KV pages
presets (shipped in hf_vram/presets/): {PRESETS}"""


def _config(args: argparse.Namespace):
    if getattr(args, "target_memory", None):
        return hf_vram.VramOptimizationConfig(target_memory=args.target_memory)
    if args.config:
        return hf_vram.VramOptimizationConfig.from_yaml(args.config)
    return hf_vram.VramOptimizationConfig.from_preset(args.preset)


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        path = Path(args.model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}; --model takes a local model folder.")
        return path

    return smollm2_path()


def _load(path, config=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def cmd_estimate(args: argparse.Namespace) -> int:
    path = _model_path(args)
    config = _config(args)
    if config.planner.enabled:
        raise ValueError("estimate takes a fixed plan (--preset or --config); --target-memory is planned by optimize.")
    rows = [
        ("float", hf_vram.estimate(path, {}, batch=args.batch, seq_len=args.seq_len, prefill_chunk=args.prefill_chunk)),
        (
            args.config or args.preset,
            hf_vram.estimate(path, config, batch=args.batch, seq_len=args.seq_len, prefill_chunk=args.prefill_chunk),
        ),
    ]
    print(f"{path.name}: estimated bytes for batch {args.batch} x {args.seq_len} tokens (no weights loaded)")
    print(f"{'config':<14} {'weights MiB':>12} {'KV MiB':>10} {'activ. MiB':>11} {'total MiB':>10}")
    for label, e in rows:
        print(
            f"{label:<14} {e.weights_bytes / 2**20:12.1f} {e.kv_cache_bytes / 2**20:10.1f} "
            f"{e.activation_bytes / 2**20:11.1f} {e.total_bytes / 2**20:10.1f}"
        )
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    config = _config(args)
    path = _model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = token_stream(tokenizer, pydoc_text(), args.tokens)
    label = args.config or (f"target {args.target_memory}" if args.target_memory else args.preset)
    rows, optimized = [], None
    with tqdm(total=4, desc="hf-vram optimize", unit="stage", disable=args.quiet) as bar:
        for name, cfg in ((label, config), ("float32", None)):  # the config first: a bad one fails fast
            bar.set_postfix_str(f"loading {name}")
            t0 = time.perf_counter()
            model = _load(path, cfg)
            load_s = time.perf_counter() - t0
            bar.update()
            bar.set_postfix_str(f"measuring {name}")
            report = hf_vram.memory_report(model)
            speed, compile_s = _speed(model, ids[:32][None], args) if args.new_tokens else (None, None)
            rows.insert(
                0 if name == "float32" else len(rows),
                {
                    "config": name,
                    "MiB": report.total / 2**20,
                    "ppl": perplexity(model, ids),
                    "tok/s": speed,
                    "load s": load_s,
                    "compile s": compile_s,
                },
            )
            bar.update()
            if name == label:
                optimized = model
            del model
    model = optimized
    base = rows[0]
    print(f"\n{label}: memory by kind\n{hf_vram.memory_report(model).table()}")
    estimated = hf_vram.estimate(path, config, batch=1, seq_len=1).weights_bytes / 2**20
    print(
        f"weights estimated before loading {estimated:.1f} MiB, measured {rows[1]['MiB']:.1f} MiB "
        f"({rows[1]['MiB'] / estimated:.3f}x)"
    )
    print(f"\n{path.name}: weights, perplexity ({args.tokens} pydoc tokens, 512-token windows), greedy decode speed")
    decode = "compiled decode, static cache" if args.compile else "eager decode"
    print(
        f"{'config':<18} {'MiB':>8} {'x float':>8} {'ppl':>8} {'ppl vs float':>13} {'tok/s':>7} {'load s':>7}"
        + (f" {'compile s':>9}" if args.compile else "")
        + f"   ({decode})"
    )
    for r in rows:
        speed = f"{r['tok/s']:7.2f}" if r["tok/s"] else "      -"
        compiled = f" {r['compile s']:9.1f}" if args.compile and r["compile s"] is not None else ""
        print(
            f"{r['config']:<18} {r['MiB']:8.1f} {r['MiB'] / base['MiB']:8.3f} {r['ppl']:8.3f} "
            f"{100 * (r['ppl'] / base['ppl'] - 1):+12.2f}% {speed} {r['load s']:7.1f}{compiled}"
        )
    if args.compile:
        print("compile s: the first compiled generate call minus a steady one, paid once per model and batch shape.")
    model.hf_vram_measurements = [
        {**r, "text": f"{args.tokens} tokens of CPython pydoc topics", "threads": torch.get_num_threads()} for r in rows
    ]
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        print(
            f"\nsaved to {args.save} (README.md model card included); load it after `import hf_vram` with "
            f"from_pretrained({args.save!r})"
        )
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def _speed(model, prompt, args: argparse.Namespace) -> tuple[float, float | None]:
    """Greedy tokens/s; with ``--compile`` the decode step is compiled (static cache), and the compile time is
    the first call's extra seconds over a steady call."""
    t0 = time.perf_counter()
    decode_rate(model, prompt, new_tokens=args.new_tokens, compiled=args.compile)  # warm-up (compiles)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rate = decode_rate(model, prompt, new_tokens=args.new_tokens, compiled=args.compile)
    return rate, max(0.0, first - (time.perf_counter() - t0)) if args.compile else None


def cmd_report(args: argparse.Namespace) -> int:
    model = _load(args.path)
    print(hf_vram.memory_report(model).table())
    if args.batch:
        estimate = hf_vram.estimate(model, batch=args.batch, seq_len=args.seq_len)
        print(f"\n{estimate.table()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    model = _load(args.path)
    if getattr(model, "quantization_method", None) != "hf_vram":
        raise ValueError(
            f"{args.path} is not an hf_vram checkpoint (its config has no hf_vram quantization_config); "
            "save the model with hf_vram first."
        )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = hf_vram.export(model, args.out, format=args.format, dtype=dtype)
    print(report.summary())
    print(f"serve it: vllm serve {args.out}   load it: AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = None
    if args.config:
        config = hf_vram.VramOptimizationConfig.from_yaml(args.config)
    elif args.preset:
        config = hf_vram.VramOptimizationConfig.from_preset(args.preset)
    if args.tenants:
        policy = AdmissionPolicy.from_file(args.tenants, args.max_concurrent, args.max_queued)
    else:
        policy = AdmissionPolicy(args.max_concurrent, args.max_queued)
    return serve(
        args.model,
        args.serve_args,
        config=config,
        kv_bits=args.kv_bits,
        kv_memory=args.kv_memory,
        policy=policy,
        adapter=args.adapter,
        step_prefill_tokens=args.step_prefill_tokens,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    script = root / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks live in the hf_vram source tree; run from a git checkout.")
    extra = [a for a in args.script_args if a != "--"]
    code = subprocess.call([sys.executable, str(script), *extra])
    if code == 0 and not args.no_table:
        code = subprocess.call([sys.executable, str(root / "write_benchmarks_md.py")])
    return code


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--preset", default="int8", help=f"a preset shipped with hf_vram: {PRESETS} (default: int8)")
    p.add_argument("--config", default=None, help="a YAML config file instead of a preset")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hf-vram", description="Cut the memory a Transformers model needs.", epilog=EPILOG, formatter_class=fmt
    )
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser(
        "estimate",
        help="weights + KV cache + activation bytes of a config, before loading",
        description="Builds the model on the meta device, shaped by the config, and counts bytes.",
    )
    _add_config_args(est)
    est.add_argument("--batch", type=int, default=1, help="sequences in flight (default 1)")
    est.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    est.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prefill in chunks of C tokens (Transformers' prefill_chunk_size; default: the config's kv_cache.prefill_chunk)",
    )
    est.set_defaults(func=cmd_estimate)
    opt = sub.add_parser(
        "optimize",
        help="load, apply a config, measure memory, perplexity and speed, save",
        description="Measures the float model and the optimized one side by side.",
    )
    _add_config_args(opt)
    opt.add_argument("--target-memory", default=None, help="plan a config that fits this size, e.g. 100MB")
    opt.add_argument("--tokens", type=int, default=4096, help="pydoc tokens for perplexity (multiple of 512)")
    opt.add_argument("--new-tokens", type=int, default=16, help="greedy tokens for the speed column (0: skip)")
    opt.add_argument(
        "--compile",
        action="store_true",
        help="decode with torch.compile and a static cache (the fast path); reports the compile time",
    )
    opt.add_argument("--save", default=None, help="save the optimized model (with a model card) to this folder")
    opt.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push it to this Hub repository")
    opt.add_argument("--quiet", action="store_true", help="no progress bar")
    opt.set_defaults(func=cmd_optimize)
    bench = sub.add_parser("bench", help="run one benchmark script and rewrite BENCHMARKS.md")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--no-table", action="store_true", help="do not rewrite BENCHMARKS.md afterwards")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script, after --")
    bench.set_defaults(func=cmd_bench)
    rep = sub.add_parser("report", help="memory breakdown of a saved model")
    rep.add_argument("path")
    rep.add_argument("--batch", type=int, default=0, help="also estimate KV and activations for this batch")
    rep.add_argument("--seq-len", type=int, default=2048)
    rep.set_defaults(func=cmd_report)
    exp = sub.add_parser(
        "export",
        help="write a saved hf_vram model in a format serving engines read",
        description="Writes compressed-tensors (vLLM, SGLang, plain Transformers); refuses by name "
        "what the format cannot hold, and then writes nothing.",
    )
    exp.add_argument("path", help="a folder saved by hf_vram")
    exp.add_argument("--out", required=True, help="the folder to write")
    exp.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])
    exp.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the float tensors and scales (default: the model's)",
    )
    exp.set_defaults(func=cmd_export)
    srv = sub.add_parser(
        "serve",
        help="Transformers' OpenAI-compatible server (transformers serve) with hf_vram: its models, its KV pages",
        description="Runs `transformers serve MODEL` in a process where hf_vram is registered. Every option not "
        "listed here goes to transformers serve (e.g. --continuous-batching, --compile, --port, --device).",
    )
    srv.add_argument("model", help="a local folder: saved by hf_vram, or a plain one with --preset/--config")
    srv.add_argument("--preset", default=None, help=f"optimize a plain checkpoint as it loads: {PRESETS}")
    srv.add_argument("--config", default=None, help="a YAML config file instead of a preset")
    srv.add_argument("--kv-bits", type=int, default=None, choices=[8, 4, 2], help="K/V page bits in continuous batching")
    srv.add_argument("--kv-memory", default=None, help="the KV budget of continuous batching, e.g. 2GiB")
    srv.add_argument(
        "--step-prefill-tokens",
        type=int,
        default=None,
        help="prompt tokens a continuous-batching step may carry beside decoding requests (kv_cache.step_prefill_tokens;"
        " hf_vram models: the config's, else 256; 0: no cap)",
    )
    srv.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, help="requests running at once, all tenants")
    srv.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, help="requests waiting for a slot; past it: 429")
    srv.add_argument("--tenants", default=None, help="YAML: tenants with api_key, max_concurrent, max_queued")
    srv.add_argument(
        "--adapter", default=None, help="a LoRA adapter folder trained on this model (hf_vram.add_lora), served unmerged"
    )
    srv.set_defaults(func=cmd_serve, serve_args=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.serve_args = rest
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"hf-vram: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
