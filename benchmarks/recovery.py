"""Recovery benchmark on SmolLM2-135M-Instruct (CPU): distillation vs plain fine-tuning, and training memory.

The student is SmolLM2 with 30% of its heads and 20% of its MLP channels pruned (Taylor scores) and its linear
layers in int4 group 128 with AWQ-style scales. Recovery trains LoRA adapters (rank 16, every linear layer but the
head) on the frozen int4 base with bitsandbytes' 8-bit AdamW, for a fixed training-time budget, twice from the same
start: with ``DistillationCallback`` (teacher: the float model) and with the plain cross-entropy. Text: CPython's
pydoc topics; held-out perplexity on the first tokens, training windows from a disjoint middle part, pruning and
AWQ calibration on the end. The curve is held-out perplexity (first ``--curve-tokens``) every ``--every`` steps;
the final point uses ``--eval-tokens``. Training time excludes the curve evaluations.

Memory: peak training memory (weights + gradients + optimizer state + activations, the foundation's tracker over
two optimizer steps plus the bytes alive before them) of LoRA-on-int4 with 8-bit AdamW against full fine-tuning of
the float model with torch's AdamW, at the same batch.
Usage: ``python benchmarks/recovery.py [--minutes 12] [--every 20]``; writes ``benchmarks/results/recovery.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, results_path, versions  # noqa: E402

RESULTS = results_path("recovery")
WINDOW = 256
COMPRESSION = {
    "pruning": {"head_ratio": 0.3, "mlp_ratio": 0.2, "method": "taylor"},
    "quantization": {"scheme": "int4", "group_size": 128, "calibration": "awq", "quantize_embeddings": False},
}


def _static_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def training_peak(model, optimizer, batch: torch.Tensor) -> dict[str, float]:
    """Peak bytes of two optimizer steps (tracked) plus what was alive before them (weights)."""
    from hf_vram import track_peak_memory

    model.train()
    static = _static_bytes(model)
    with track_peak_memory() as peak:
        for _ in range(2):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"static_mib": static / 2**20, "tracked_peak_mib": peak.peak_mib, "total_mib": static / 2**20 + peak.peak_mib}


def memory_rows(teacher, student_factory, batch) -> dict[str, dict]:
    import bitsandbytes as bnb

    import hf_vram

    full = copy.deepcopy(teacher)
    rows = {"full fine-tuning, fp32 + AdamW": training_peak(full, torch.optim.AdamW(full.parameters(), lr=1e-5), batch)}
    del full
    lora = hf_vram.add_lora(student_factory(), r=16, lora_alpha=32)
    params = [p for p in lora.parameters() if p.requires_grad]
    rows["LoRA r16 on pruned int4 + AdamW8bit"] = training_peak(lora, bnb.optim.AdamW8bit(params, lr=1e-4), batch)
    return rows


class CurveAndBudget(TrainerCallback):
    """Held-out perplexity every ``every`` steps; stops training when its time (evaluations excluded) passes the budget."""

    def __init__(self, evaluate, every: int, budget_s: float) -> None:
        self.evaluate, self.every, self.budget_s = evaluate, every, budget_s
        self.curve: list[tuple[int, float, float]] = []  # (step, train seconds, ppl)
        self.eval_s = 0.0
        self.start = 0.0

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = time.perf_counter()
        self.curve.append((0, 0.0, self._eval(model)))

    def _eval(self, model) -> float:
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        ppl = self.evaluate(model)
        model.train(was)
        self.eval_s += time.perf_counter() - t0
        return ppl

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_s

    def on_step_end(self, args, state, control, model=None, **kw):
        spent = self.train_seconds()
        if state.global_step % self.every == 0:
            self.curve.append((state.global_step, round(spent, 1), self._eval(model)))
        if spent >= self.budget_s:
            control.should_training_stop = True


def recover(student, teacher, train_ids, curve_eval, budget_s, every, lr, batch_size) -> dict:
    from transformers import Trainer, TrainingArguments

    import hf_vram
    from hf_vram.data import TokenWindows

    model = hf_vram.add_lora(student, r=16, lora_alpha=32)
    curve = CurveAndBudget(curve_eval, every, budget_s)
    callbacks = [curve] + ([hf_vram.DistillationCallback(teacher, temperature=2.0, alpha=0.5)] if teacher else [])
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        max_steps=100_000,
        num_train_epochs=100,
        learning_rate=lr,
        warmup_steps=10,
        lr_scheduler_type="constant_with_warmup",
        optim="adamw_bnb_8bit",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows(train_ids), callbacks=callbacks)
    trainer.train()
    steps = trainer.state.global_step
    if curve.curve[-1][0] != steps:
        curve.curve.append((steps, round(curve.train_seconds(), 1), curve._eval(model)))
    return {
        "model": model.eval(),
        "curve": curve.curve,
        "steps": steps,
        "train_s": round(curve.train_seconds(), 1),
        "tokens": steps * batch_size * WINDOW,
    }


def tables(result: dict) -> list[str]:
    """Markdown for BENCHMARKS.md."""
    st = result["settings"]
    kd, plain = result["distillation"], result["plain fine-tuning"]
    half = (result["ppl_float"] + result["ppl_compressed"]) / 2
    where = result["machine"]
    if isinstance(where, dict):  # results written before the machine label held the CPU flags
        where = f"{where['cpu']}, {where['threads']} threads"
    lines = [
        "## Recovery: distillation vs plain fine-tuning (`benchmarks/recovery.py`, CPU)",
        "",
        f"Run on {where}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + ". SmolLM2 with 30% of heads and 20% of "
        "MLP channels pruned (Taylor) and int4 g128 AWQ-style linear layers; LoRA r16 on every linear layer "
        f"(frozen int4 base), 8-bit AdamW, lr {st['lr']}, batch {st['batch_size']} x {st['window']} tokens, "
        f"{st['minutes']:g} minutes of training each (evaluations excluded), from the same start. Distillation: "
        "T = 2, alpha = 0.5, teacher = the float model, logits on the fly. Perplexity on the first "
        f"{st['curve_tokens']} pydoc tokens along the curve and {st['eval_tokens']} at the end; training text "
        "from a disjoint middle part.",
        "",
        f"Float {result['ppl_float']:.3f}, compressed {result['ppl_compressed']:.3f}: closing half of the gap means "
        f"reaching {half:.3f}.",
        "",
        "| run | steps | tokens | train s | final ppl | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("distillation", kd), ("plain fine-tuning", plain)):
        lines.append(
            f"| {name} | {run['steps']} | {run['tokens']} | {run['train_s']:.0f} | {run['ppl_final']:.3f} | "
            f"{run['gap_closed']:.0%} |"
        )
    lines += [
        "",
        "Curve (held-out perplexity on the curve tokens):",
        "",
        "| step | distillation: train s, ppl | plain: train s, ppl |",
        "|---|---|---|",
    ]
    plain_by_step = {step: (sec, ppl) for step, sec, ppl in plain["curve"]}
    for step, sec, ppl in kd["curve"]:
        other = plain_by_step.get(step)
        right = f"{other[0]:.0f} s, {other[1]:.2f}" if other else ""
        lines.append(f"| {step} | {sec:.0f} s, {ppl:.2f} | {right} |")
    for step, sec, ppl in plain["curve"]:
        if step not in {c[0] for c in kd["curve"]}:
            lines.append(f"| {step} | | {sec:.0f} s, {ppl:.2f} |")
    lines += [
        "",
        "Peak training memory (weights + gradients + optimizer state + activations, two optimizer steps, "
        f"batch {st['batch_size']} x {st['window']}; the foundation's tracker):",
        "",
        "| setup | weights MiB | tracked peak MiB | total MiB |",
        "|---|---|---|---|",
    ]
    for name, row in result["memory"].items():
        lines.append(f"| {name} | {row['static_mib']:.1f} | {row['tracked_peak_mib']:.1f} | {row['total_mib']:.1f} |")
    if result.get("note"):
        lines += ["", result["note"]]
    full, lora = result["memory"].values()
    lines += [
        "",
        f"LoRA on int4 with 8-bit AdamW needs {full['total_mib'] / lora['total_mib']:.2f}x less memory "
        "than full fine-tuning of the float model.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training-time budget of each recovery run")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--curve-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import hf_vram
    from hf_vram.assets import load_smollm2, pydoc_text
    from hf_vram.evaluation import perplexity, token_stream

    teacher, tokenizer = load_smollm2()
    stream = token_stream(tokenizer, pydoc_text(), 113_000)
    held_out = stream[: args.eval_tokens]
    train_end = stream.numel() - 16 * WINDOW  # the last windows calibrate pruning and AWQ
    train_ids = stream[args.eval_tokens + 4096 : train_end]
    train_ids = train_ids[: train_ids.numel() // WINDOW * WINDOW].view(-1, WINDOW)

    def compressed():
        model = copy.deepcopy(teacher)
        hf_vram.optimize(model, copy.deepcopy(COMPRESSION))
        return model

    start = compressed()
    results: dict = {
        "machine": machine(torch.get_num_threads()),
        "versions": versions(),
        "settings": {
            **vars(args),
            "compression": COMPRESSION,
            "train_windows": train_ids.shape[0],
            "window": WINDOW,
            "lora": {"r": 16, "alpha": 32},
            "distillation": {"temperature": 2.0, "alpha": 0.5},
        },
        "ppl_float": perplexity(teacher, held_out),
        "ppl_compressed": perplexity(start, held_out),
    }
    print(f"float {results['ppl_float']:.3f}, compressed {results['ppl_compressed']:.3f}", flush=True)
    results["memory"] = memory_rows(teacher, compressed, train_ids[: args.batch_size])
    print(json.dumps(results["memory"], indent=1), flush=True)

    def curve_eval(model) -> float:
        return perplexity(model, held_out[: args.curve_tokens])

    for name, with_teacher in (("distillation", True), ("plain fine-tuning", False)):
        run = recover(
            copy.deepcopy(start),
            teacher if with_teacher else None,
            train_ids,
            curve_eval,
            args.minutes * 60,
            args.every,
            args.lr,
            args.batch_size,
        )
        run["ppl_final"] = perplexity(run.pop("model"), held_out)
        gap = results["ppl_compressed"] - results["ppl_float"]
        run["gap_closed"] = (results["ppl_compressed"] - run["ppl_final"]) / gap
        results[name] = run
        print(name, json.dumps(run), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
