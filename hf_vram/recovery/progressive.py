"""Progressive pruning during training: cut a little, train, re-score, cut again.

The seed recipe (prune 5% at a time, fine-tune between cuts, distil from the original) as a Trainer callback.
At the scheduled steps the callback re-scores the model being trained with pruning's importance scores (Taylor or
activation, on the calibration ids), re-plans from what is left, and cuts to ``k / n_cuts`` of the target ratios.

Cutting replaces the pruned layers' ``nn.Parameter`` objects, so the callback re-points the optimizer's parameter
groups at the new tensors by name and drops their optimizer state (Adam moments of removed rows have no meaning;
the kept rows restart their moments, a short warm-up). Parameters of untouched layers keep their state. DDP keeps
its own parameter buckets, so the callback runs on one process: prune, then distribute the recovery.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from transformers import TrainerCallback

from hf_vram.config import PruningSection
from hf_vram.pruning.plan import PruningPlan
from hf_vram.pruning.prune import default_pruning_ids, prune_step
from hf_vram.pruning.sites import check_supported

logger = logging.getLogger("hf_vram")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model to cut; adapters would keep the old shapes, so a PEFT-wrapped model is refused."""
    if callable(getattr(model, "get_base_model", None)):
        raise NotImplementedError(
            "hf_vram ProgressivePruningCallback cuts the trained model's own weights, and LoRA adapters would keep "
            "the old shapes: prune progressively with full fine-tuning of the float model, then quantize and add LoRA."
        )
    return model


class ProgressivePruningCallback(TrainerCallback):
    """Prune to ``section``'s ratios in ``n_cuts`` cuts, every ``interval`` optimizer steps from ``start_step``."""

    def __init__(
        self,
        section: PruningSection | dict,
        n_cuts: int = 6,
        interval: int = 50,
        start_step: int = 0,
        calibration_ids: torch.Tensor | None = None,
    ) -> None:
        self.section = section if isinstance(section, PruningSection) else PruningSection(**section)
        self.section.validate()
        for name, value in (("n_cuts", n_cuts), ("interval", interval)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hf_vram ProgressivePruningCallback: {name}={value!r} is invalid; use an int >= 1.")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"hf_vram ProgressivePruningCallback: start_step={start_step!r} is invalid; use an int >= 0.")
        self.n_cuts, self.interval, self.start_step = n_cuts, interval, start_step
        self.calibration_ids = calibration_ids
        self.cuts_done = 0
        self.history: list[tuple[int, PruningPlan]] = []  # (global step, plan after the cut)

    @property
    def schedule(self) -> list[int]:
        """The optimizer steps after which a cut happens."""
        return [self.start_step + k * self.interval for k in range(1, self.n_cuts + 1)]

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if args.world_size > 1:
            raise NotImplementedError(
                "hf_vram ProgressivePruningCallback runs on one process (DDP/FSDP keep their own parameter buckets, "
                "which pruning reshapes); prune on one process first, then run the distributed recovery."
            )
        base = _unwrap(model)
        check_supported(base, True, True)
        if self.section.method in ("taylor", "activation") and self.calibration_ids is None:
            self.calibration_ids = default_pruning_ids(base, self.section)

    def on_step_end(self, args, state, control, model: nn.Module | None = None, optimizer=None, **kwargs: Any) -> None:
        if self.cuts_done >= self.n_cuts or state.global_step != self.schedule[self.cuts_done]:
            return
        self.cuts_done += 1
        self.cut(model, optimizer, state.global_step)

    def cut(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> PruningPlan:
        """One re-scored cut to ``cuts_done / n_cuts`` of the target; keeps the optimizer pointing at live tensors."""
        base = _unwrap(model)
        before = dict(model.named_parameters())
        was_training = model.training
        ids = self.calibration_ids.to(next(base.parameters()).device) if self.calibration_ids is not None else None
        plan = prune_step(base, self.section, ids, self.cuts_done / self.n_cuts, self.cuts_done)
        model.train(was_training)
        if optimizer is not None:
            _repoint_optimizer(optimizer, before, dict(model.named_parameters()))
        self.history.append((step, plan))
        self.section.state.pruning_plan = plan.to_dict()
        logger.info("hf_vram: progressive cut %d/%d at step %d: %s", self.cuts_done, self.n_cuts, step, plan.summary())
        return plan


def _repoint_optimizer(optimizer: Any, before: dict[str, nn.Parameter], after: dict[str, nn.Parameter]) -> None:
    name_of = {id(p): name for name, p in before.items()}
    state = optimizer.state
    for group in optimizer.param_groups:
        fresh = []
        for p in group["params"]:
            name = name_of.get(id(p))
            new = after.get(name) if name is not None else p
            if new is None:
                continue
            if new is not p:
                state.pop(p, None)
            fresh.append(new)
        group["params"] = fresh
