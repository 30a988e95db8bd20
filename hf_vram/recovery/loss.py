"""The knowledge-distillation loss: ``alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``.

Both terms are sums over the tokens that have a label (next-token shift, ``-100`` ignored) divided by
``num_items_in_batch`` when the Trainer gives it, so gradient accumulation sees the same normalisation as
Transformers' own causal-LM loss; without it they are per-token means. ``T^2`` keeps the KL gradient's scale
independent of the temperature (Hinton et al., 2015).

With top-k teacher logits (``teacher_topk=(values, indices)``, from a disk cache) the teacher distribution is the
softmax over its k largest logits and the KL is taken on that support, against the student's full log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class DistillationLoss:
    """The combined loss and its two parts (for logging)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def _shift(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = student_logits[:, :-1].float()
    targets = labels[:, 1:]
    return logits, targets, targets != IGNORE_INDEX


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> DistillationLoss:
    """KD loss for causal LMs; ``labels`` are the unshifted input labels as Transformers takes them."""
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("hf_vram distillation: give exactly one of teacher_logits or teacher_topk.")
    logits, targets, valid = _shift(student_logits, labels)
    count = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    if isinstance(count, torch.Tensor):
        count = count.to(logits.device)
    ce = (
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        / count
    )
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"hf_vram distillation: teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                f"{tuple(student_logits.shape)}; teacher and student must share the tokenizer and see the same batch."
            )
        teacher_logp = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
        per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    else:
        values, indices = teacher_topk
        teacher_logp = F.log_softmax(values[:, :-1].float() / temperature, dim=-1)
        student_at = student_logp.gather(-1, indices[:, :-1].long())
        per_token = (teacher_logp.exp() * (teacher_logp - student_at)).sum(-1)
    kl = (per_token * valid).sum() / count * temperature**2
    return DistillationLoss(alpha * ce + (1 - alpha) * kl, ce.detach(), kl.detach())
