"""Recovery: win back the accuracy compression costs, by distillation from the uncompressed model.

- ``DistillationCallback`` / ``DistillationTrainer``: KD loss for the stock Trainer (``distillation.py``).
- ``ProgressivePruningCallback``: prune in cuts during training, re-scoring between them (``progressive.py``).
- ``add_lora`` / ``load_lora_adapter``: PEFT LoRA on frozen int8/int4 layers (``lora.py``).
- ``distillation_loss`` and the teacher's logits, on the fly or top-k cached on disk (``loss.py``, ``teacher.py``).
"""

from hf_vram.recovery.distillation import DistillationCallback, DistillationTrainer
from hf_vram.recovery.lora import QuantLoraLinear, add_lora, load_lora_adapter, lora_config
from hf_vram.recovery.loss import DistillationLoss, distillation_loss
from hf_vram.recovery.progressive import ProgressivePruningCallback
from hf_vram.recovery.teacher import TopKLogitCache, teacher_logits

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
