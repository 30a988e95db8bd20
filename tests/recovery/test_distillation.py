"""DistillationCallback on the stock Trainer, DistillationTrainer, the top-k cache and progressive pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_vram
from hf_vram.data import TokenWindows
from hf_vram.pruning.sites import attention_sites, mlp_sites
from hf_vram.recovery import DistillationCallback, DistillationTrainer, ProgressivePruningCallback, add_lora
from hf_vram.recovery.loss import distillation_loss
from tests.tiny_models import build_tiny


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=1,
        learning_rate=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    return TrainingArguments(**{**base, **kw})


def _windows(n, length=24, seed=0, vocab=320):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _pair(arch="llama", **sections):
    teacher = build_tiny(arch).eval()
    with torch.no_grad():  # a random tiny model is nearly uniform; sharpen it so there is something to distil
        teacher.model.norm.weight.mul_(20)
    student = copy.deepcopy(teacher)
    hf_vram.optimize(student, {"pruning": {"head_ratio": 0.5, "mlp_ratio": 0.5, "method": "magnitude"}, **sections})
    return teacher, student


def test_callback_loss_is_the_kd_loss_of_the_batch_and_eval_stays_plain_ce(tmp_path):
    teacher, student = _pair()
    ids = _windows(4)
    callback = DistillationCallback(teacher, temperature=2.0, alpha=0.3)
    trainer = Trainer(
        model=student, args=_args(tmp_path), train_dataset=TokenWindows(ids), eval_dataset=TokenWindows(ids), callbacks=[callback]
    )
    result = trainer.train()
    with torch.no_grad():
        expected = distillation_loss(
            student(input_ids=ids).logits, ids, teacher(input_ids=ids).logits, temperature=2.0, alpha=0.3
        ).loss
        plain_ce = student(input_ids=ids, labels=ids).loss
    assert result.training_loss == pytest.approx(expected.item(), rel=1e-5)
    assert {"distill_ce", "distill_kl"} <= set(trainer.state.log_history[0])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain_ce.item(), rel=1e-5)
    assert not student._forward_hooks_with_kwargs  # the hook is gone after training


def test_distillation_trainer_matches_the_callback(tmp_path):
    teacher, student = _pair()
    ids = _windows(4)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, temperature=2.0, alpha=0.3, args=_args(tmp_path), train_dataset=TokenWindows(ids)
    )
    with torch.no_grad():
        expected = distillation_loss(
            student(input_ids=ids).logits, ids, teacher(input_ids=ids).logits, temperature=2.0, alpha=0.3
        ).loss
    assert trainer.train().training_loss == pytest.approx(expected.item(), rel=1e-5)


def _held_out_kl(student, teacher, ids):
    with torch.no_grad():
        return distillation_loss(student(input_ids=ids).logits, ids, teacher(input_ids=ids).logits, alpha=0.0).loss.item()


@pytest.mark.parametrize("scheme", ["float", "int4"])
def test_a_few_recovery_steps_lower_the_held_out_loss(tmp_path, scheme):
    quantization = {"scheme": "int4", "group_size": 32} if scheme == "int4" else {"scheme": "none"}
    teacher, student = _pair(quantization=quantization)
    if scheme == "int4":
        student = add_lora(student, r=8, lora_alpha=16)
    held_out = _windows(8, seed=99)
    before = _held_out_kl(student, teacher, held_out)
    args = _args(tmp_path, max_steps=30, learning_rate=3e-4 if scheme == "float" else 3e-3, num_train_epochs=100)
    Trainer(
        model=student,
        args=args,
        train_dataset=TokenWindows(_windows(32, seed=1)),
        callbacks=[DistillationCallback(teacher, temperature=1.0, alpha=0.0)],
    ).train()
    after = _held_out_kl(student.eval(), teacher, held_out)
    assert after < 0.8 * before, (before, after)


def test_topk_cache_is_filled_once_and_reused(tmp_path):
    teacher, student = _pair()
    ids = _windows(8)
    full = (
        Trainer(
            model=copy.deepcopy(student),
            args=_args(tmp_path, max_steps=4),
            train_dataset=TokenWindows(ids),
            callbacks=[DistillationCallback(teacher, alpha=0.5)],
        )
        .train()
        .training_loss
    )
    callback = DistillationCallback(teacher, alpha=0.5, top_k=320, cache_dir=tmp_path / "cache")
    cached = (
        Trainer(model=student, args=_args(tmp_path, max_steps=4), train_dataset=TokenWindows(ids), callbacks=[callback])
        .train()
        .training_loss
    )
    assert (callback.cache.misses, callback.cache.hits) == (8, 8)  # 8 rows, 2 epochs: shuffled batches still hit
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 8
    assert cached == pytest.approx(full, rel=1e-4)  # k = vocabulary: the cache is exact


def test_callback_refuses_missing_labels_and_bad_settings(tmp_path):
    teacher, student = _pair()
    with pytest.raises(ValueError, match="both top_k and cache_dir"):
        DistillationCallback(teacher, top_k=8)
    with pytest.raises(ValueError, match="recovery.temperature=0"):
        DistillationCallback(teacher, temperature=0)
    callback = DistillationCallback(teacher)
    callback.attach(student.train())
    with pytest.raises(ValueError, match="DataCollatorForLanguageModeling"):
        student(input_ids=_windows(2))
    callback.detach()


def test_progressive_pruning_reaches_the_ratio_on_schedule_while_training(tmp_path):
    teacher = build_tiny("gpt2").eval()
    student = copy.deepcopy(teacher)
    pruning = ProgressivePruningCallback(
        {"head_ratio": 0.5, "mlp_ratio": 0.5, "method": "taylor"}, n_cuts=4, interval=2, calibration_ids=_windows(2, 16, seed=5)
    )
    seen = []

    class Watch(hf_vram.recovery.distillation.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            heads = sum(s.num_heads for s in attention_sites(model))
            channels = sum(s.down.weight.shape[0] for s in mlp_sites(model))  # GPT-2 Conv1D c_proj: [in, out]
            live = {id(p) for p in model.parameters()}
            assert all(id(p) in live for g in optimizer.param_groups for p in g["params"])
            seen.append((state.global_step, heads, channels))

    trainer = Trainer(
        model=student,
        args=_args(tmp_path, max_steps=9, learning_rate=1e-3, num_train_epochs=100),
        train_dataset=TokenWindows(_windows(16, seed=3)),
        callbacks=[pruning, Watch(), DistillationCallback(teacher)],
    )
    result = trainer.train()
    assert [step for step, _ in pruning.history] == [2, 4, 6, 8]
    assert [heads for _, heads, _ in seen] == [8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert [c for _, _, c in seen][1::2] == [448, 384, 320, 256]  # 2 x 256 channels, 1/8 per cut
    assert torch.isfinite(torch.tensor(result.training_loss))
    with pytest.raises(ValueError, match="n_cuts=0"):
        ProgressivePruningCallback({"head_ratio": 0.5}, n_cuts=0)
