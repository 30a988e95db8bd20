"""The KD loss against a hand computation (plain Python loops over tokens and the vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_vram.recovery.loss import distillation_loss


def _hand_loss(student, teacher, labels, temperature, alpha, count):
    ce = kl = 0.0
    for b in range(student.shape[0]):
        for t in range(student.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            s = [float(v) for v in student[b, t]]
            z = math.log(sum(math.exp(v) for v in s))
            ce += z - s[target]
            st = [v / temperature for v in s]
            tt = [float(v) / temperature for v in teacher[b, t]]
            zs = math.log(sum(math.exp(v) for v in st))
            zt = math.log(sum(math.exp(v) for v in tt))
            kl += sum(math.exp(x - zt) * ((x - zt) - (y - zs)) for x, y in zip(tt, st, strict=True))
    return alpha * ce / count + (1 - alpha) * temperature**2 * kl / count


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, -100, -100, 3]])
    return student, teacher, labels


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (2.0, 0.3), (4.0, 0.0), (1.5, 1.0)])
def test_kd_loss_equals_hand_computation(batch, temperature, alpha):
    student, teacher, labels = batch
    valid = 4 + 2  # labels[:, 1:] that are not -100
    got = distillation_loss(student.float(), labels, teacher.float(), temperature=temperature, alpha=alpha)
    assert got.loss.item() == pytest.approx(_hand_loss(student, teacher, labels, temperature, alpha, valid), rel=1e-5)


def test_num_items_in_batch_sets_the_normaliser(batch):
    """Gradient accumulation: the Trainer's item count over the whole accumulated batch divides both terms."""
    student, teacher, labels = batch
    got = distillation_loss(student.float(), labels, teacher.float(), temperature=2.0, alpha=0.5, num_items_in_batch=12)
    assert got.loss.item() == pytest.approx(_hand_loss(student, teacher, labels, 2.0, 0.5, 12), rel=1e-5)


def test_topk_with_the_whole_vocabulary_equals_full_logits(batch):
    student, teacher, labels = batch
    full = distillation_loss(student.float(), labels, teacher.float(), temperature=2.0, alpha=0.4)
    top = teacher.float().topk(7, dim=-1)
    cached = distillation_loss(student.float(), labels, teacher_topk=(top.values, top.indices), temperature=2.0, alpha=0.4)
    assert cached.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    top3 = teacher.float().topk(3, dim=-1)
    partial = distillation_loss(student.float(), labels, teacher_topk=(top3.values, top3.indices), alpha=0.4)
    assert partial.loss.item() != pytest.approx(full.loss.item(), rel=1e-3)  # k < vocab is an approximation


def test_identical_teacher_gives_zero_kl(batch):
    student, _, labels = batch
    got = distillation_loss(student.float(), labels, student.float(), alpha=0.0)
    assert abs(got.kl.item()) < 1e-6


def test_mismatched_teacher_is_refused(batch):
    student, teacher, labels = batch
    with pytest.raises(ValueError, match="share the tokenizer"):
        distillation_loss(student.float(), labels, teacher[..., :5].float())
    with pytest.raises(ValueError, match="exactly one of"):
        distillation_loss(student.float(), labels)
