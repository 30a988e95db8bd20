"""Recovery: win back the accuracy compression costs, by distillation from the uncompressed model.

- ``DistillationCallback`` / ``DistillationTrainer``: KD loss for the stock Trainer (``distillation.py``).
- ``ProgressivePruningCallback``: prune in cuts during training, re-scoring between them (``progressive.py``).
- ``add_lora`` / ``load_lora_adapter``: PEFT LoRA on frozen int8/int4 layers (``lora.py``).
- ``distillation_loss`` and the teacher's logits, on the fly or top-k cached on disk (``loss.py``, ``teacher.py``).
"""

from hf_vram._lazy import lazy_getattr

# name -> submodule, imported on first access (the Trainer and PEFT take seconds to import)
__getattr__ = lazy_getattr(
    __name__,
    {
        "DistillationCallback": ".distillation",
        "DistillationTrainer": ".distillation",
        "QuantLoraLinear": ".lora",
        "add_lora": ".lora",
        "load_lora_adapter": ".lora",
        "lora_config": ".lora",
        "DistillationLoss": ".loss",
        "distillation_loss": ".loss",
        "ProgressivePruningCallback": ".progressive",
        "TopKLogitCache": ".teacher",
        "teacher_logits": ".teacher",
    },
)

__all__ = [
    "DistillationCallback",
    "DistillationLoss",
    "DistillationTrainer",
    "ProgressivePruningCallback",
    "QuantLoraLinear",
    "TopKLogitCache",
    "add_lora",
    "distillation_loss",
    "load_lora_adapter",
    "lora_config",
    "teacher_logits",
]
