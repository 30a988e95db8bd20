"""Distillation for the stock ``transformers.Trainer``: ``Trainer(..., callbacks=[DistillationCallback(teacher)])``.

Trainer callbacks never see the batch, and ``compute_loss_func`` never sees the inputs, so neither can fetch the
teacher's logits for the batch being trained. The one place that sees the batch, the student's outputs and the
Trainer's ``num_items_in_batch`` together is the student's own forward. So the callback registers a forward hook
(with kwargs) on the student in ``on_train_begin``: when the student runs in training mode with labels, the hook runs
the teacher on the same ``input_ids``/``attention_mask`` under ``no_grad`` and replaces ``outputs.loss`` by the
distillation loss, normalised exactly like Transformers' causal-LM loss (sum over labelled tokens / items in the
accumulated batch). Evaluation (``model.eval()``) keeps the plain cross-entropy, so ``eval_loss`` stays a
perplexity. The hook is removed in ``on_train_end``. It works through PEFT, DDP and FSDP wrappers, which all call
the hooked module. ``DistillationTrainer`` is the same thing as a Trainer subclass, for those who prefer one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback

from hf_vram.config import RecoverySection
from hf_vram.recovery.loss import distillation_loss
from hf_vram.recovery.teacher import TopKLogitCache, teacher_logits


class DistillationCallback(TrainerCallback):
    """Adds ``(1 - alpha) * T^2 * KL(teacher || student)`` to the training loss of any Trainer run."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        top_k: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        RecoverySection(temperature=temperature, alpha=alpha).validate()  # the same checks and messages as the config
        if (top_k is None) != (cache_dir is None):
            raise ValueError(
                "hf_vram distillation: top-k caching needs both top_k and cache_dir (e.g. top_k=64, "
                "cache_dir='teacher_cache'); give neither to compute the teacher's full logits every step."
            )
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.cache = TopKLogitCache(cache_dir, top_k) if top_k is not None else None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._sums = {"distill_ce": 0.0, "distill_kl": 0.0}
        self._count = 0

    @classmethod
    def from_config(cls, teacher: nn.Module, section: RecoverySection, **kwargs: Any) -> DistillationCallback:
        """Build from a ``VramOptimizationConfig.recovery`` section (temperature, alpha, top-k cache)."""
        top_k = section.top_k or None
        return cls(teacher, section.temperature, section.alpha, top_k, section.cache_dir if top_k else None, **kwargs)

    # -- the loss, computed inside the student's forward ---------------------------------------------------------
    def loss_for(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        student_logits: torch.Tensor,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """The distillation loss of one batch (used by the hook and by ``DistillationTrainer``)."""
        if self.cache is not None:
            topk = self.cache.get(self.teacher, input_ids, attention_mask)
            parts = distillation_loss(
                student_logits,
                labels,
                teacher_topk=topk,
                temperature=self.temperature,
                alpha=self.alpha,
                num_items_in_batch=num_items_in_batch,
            )
        else:
            logits = teacher_logits(self.teacher, input_ids, attention_mask)
            parts = distillation_loss(
                student_logits,
                labels,
                logits,
                temperature=self.temperature,
                alpha=self.alpha,
                num_items_in_batch=num_items_in_batch,
            )
        self._sums["distill_ce"] += float(parts.ce)
        self._sums["distill_kl"] += float(parts.kl)
        self._count += 1
        return parts.loss

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not module.training:
            return output
        labels = kwargs.get("labels")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if labels is None or input_ids is None:
            raise ValueError(
                "hf_vram DistillationCallback: the student was called in training without input_ids and labels, so "
                "there is nothing to distil on. Use a causal-LM data collator (DataCollatorForLanguageModeling with "
                "mlm=False) and do not set compute_loss_func or label_smoothing_factor, which take labels out."
            )
        output["loss"] = self.loss_for(
            input_ids, kwargs.get("attention_mask"), labels, output["logits"], kwargs.get("num_items_in_batch")
        )
        return output

    # -- Trainer events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("hf_vram DistillationCallback: the Trainer gave no model to hook.")
        self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Hook ``model``'s forward (the Trainer's model: plain, PEFT-wrapped, or the module inside DDP/FSDP)."""
        self.detach()
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.detach()

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or not self._count or "loss" not in logs:
            return
        means = {k: round(v / self._count, 6) for k, v in self._sums.items()}
        logs.update(means)
        if state.log_history:
            state.log_history[-1].update(means)  # the Trainer appends a copy before callbacks run
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._count = 0


class DistillationTrainer(Trainer):
    """``Trainer`` with a teacher: ``DistillationTrainer(teacher=..., temperature=..., alpha=..., model=..., ...)``.

    A convenience over ``Trainer(callbacks=[DistillationCallback(...)])``; the loss is the same function.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        top_k: int | None = None,
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.distillation = DistillationCallback(teacher, temperature, alpha, top_k, cache_dir)
        callbacks = [*(kwargs.pop("callbacks", None) or []), self.distillation]
        super().__init__(*args, callbacks=callbacks, **kwargs)
