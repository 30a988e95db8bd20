"""Prune -> quantize -> recover -> save: the whole compression recipe on the bundled SmolLM2 (or any local model).

1. the teacher: the float model; 2. the student: the same checkpoint loaded with an hf_vram config that prunes
heads and MLP channels (Taylor scores) and quantizes to int4; 3. recovery: LoRA adapters on the frozen int4 layers,
trained by the stock Trainer with ``DistillationCallback`` (8-bit AdamW from bitsandbytes); 4. the compressed model
(saved before training) and the adapter (saved after) reload through plain ``from_pretrained`` (after ``import
hf_vram``) and ``hf_vram.load_lora_adapter``. The adapter is kept, not merged: merging re-quantizes, and a short run's
update is finer than the int4 grid (``merge_and_unload`` would round it away, and warns when it does).

Runs unchanged on one process or under ``accelerate launch`` (DDP/FSDP configs in ``configs/accelerate/``):
    python examples/prune_and_recover.py --steps 30
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml examples/prune_and_recover.py --steps 30
``--model DIR`` takes another local checkpoint; ``--random-data`` trains on random tokens (models without a tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_vram
from hf_vram.data import TokenWindows
from hf_vram.evaluation import perplexity, token_stream


def _data(args, model_dir: Path, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows, held-out ids or None): pydoc text when the model has a tokenizer, else random tokens."""
    if args.random_data:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (64, args.window), generator=g), None
    from transformers import AutoTokenizer

    from hf_vram.assets import pydoc_text

    stream = token_stream(AutoTokenizer.from_pretrained(model_dir), pydoc_text(), 60_000)
    held_out = stream[:4096]
    train = stream[8192 : 8192 + 128 * args.window].view(-1, args.window)  # disjoint from the held-out part
    return train, held_out


def _fingerprint(model: torch.nn.Module) -> str:
    """A hash of every trainable tensor: the processes of a distributed run must agree on it."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local checkpoint folder (default: the bundled SmolLM2)")
    parser.add_argument("--output", default="out/recovered", help="the compressed model; its adapter in OUTPUT/adapter")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--head-ratio", type=float, default=0.3)
    parser.add_argument("--mlp-ratio", type=float, default=0.2)
    parser.add_argument("--scheme", default="int4", choices=["int4", "int8"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--random-data", action="store_true")
    args = parser.parse_args()

    if args.model:
        model_dir = Path(args.model)
    else:
        from hf_vram.assets import smollm2_path

        model_dir = smollm2_path()
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = hf_vram.VramOptimizationConfig(
        # Taylor scores need text; with random tokens (no tokenizer) the data-free magnitude scores are used
        pruning={
            "head_ratio": args.head_ratio,
            "mlp_ratio": args.mlp_ratio,
            "method": "magnitude" if args.random_data else "taylor",
        },
        quantization={"scheme": args.scheme, "group_size": args.group_size},
        recovery={"temperature": 2.0, "alpha": 0.5, "lora_rank": 16, "lora_alpha": 32},
    )
    student = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    train_ids, held_out = _data(args, model_dir, teacher.config.vocab_size)
    if held_out is not None:
        print(f"held-out ppl: float {perplexity(teacher, held_out):.3f}, compressed {perplexity(student, held_out):.3f}")

    output = Path(args.output)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        student.save_pretrained(output)  # before the adapters go in: every process holds the same compressed model
    model = hf_vram.add_lora(student, r=config.recovery.lora_rank, lora_alpha=config.recovery.lora_alpha)
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=2,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=min(10, args.steps // 5),
        lr_scheduler_type="constant_with_warmup",
        optim="adamw_bnb_8bit",
        logging_steps=max(1, args.steps // 10),
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=TokenWindows(train_ids),
        callbacks=[hf_vram.DistillationCallback.from_config(teacher, config.recovery)],
    )
    trainer.train()

    ranks = output.with_name(output.name + ".ranks")  # save_pretrained replaces `output` as a whole
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "fingerprint": _fingerprint(model),
                "world_size": trainer.args.world_size,
                "steps": trainer.state.global_step,
                "loss": [log["loss"] for log in trainer.state.log_history if "loss" in log],
            }
        )
    )
    if not trainer.is_world_process_zero():
        return
    model.eval()
    model.save_pretrained(output / "adapter")  # the adapter alone
    reloaded = hf_vram.load_lora_adapter(AutoModelForCausalLM.from_pretrained(output), str(output / "adapter")).eval()
    if held_out is not None:
        print(f"held-out ppl after recovery: {perplexity(reloaded, held_out):.3f}")
    probe = train_ids[:1, :32]
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=probe).logits, model(input_ids=probe).logits)
    print(f"saved to {output}, adapter in {output / 'adapter'}; the two reload it identically: {same}")
    if not same:
        raise SystemExit("hf_vram: the reloaded model differs from the one saved")


if __name__ == "__main__":
    try:
        main()
    finally:  # a rank that exits with its process group alive can abort at interpreter exit (gloo's threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
