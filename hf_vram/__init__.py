"""hf_vram: cut the memory a Transformers language model needs, behind one config.

``import hf_vram`` registers the ``hf_vram`` quantization method with Transformers; it must run before
``from_pretrained`` of a model saved by hf_vram.
"""

from hf_vram.config import (
    FusionSection,
    KVCacheSection,
    PlannerSection,
    PruningSection,
    QuantizationSection,
    RecoverySection,
    VramOptimizationConfig,
)
from hf_vram.data import calibration_ids
from hf_vram.hf.registration import register as _register
from hf_vram.kvcache import KVCachePool, PooledKVCache, PoolExhaustedError
from hf_vram.kvcache.engine import generate_many
from hf_vram.memory.report import MemoryReport, memory_report
from hf_vram.memory.tracker import PeakMemory, track_peak_memory
from hf_vram.pipeline import optimize
from hf_vram.planner import MemoryEstimate, estimate
from hf_vram.recovery import (
    DistillationCallback,
    DistillationTrainer,
    ProgressivePruningCallback,
    add_lora,
    load_lora_adapter,
)

__version__ = "0.1.0"

_register()

__all__ = [
    "DistillationCallback",
    "DistillationTrainer",
    "ProgressivePruningCallback",
    "add_lora",
    "load_lora_adapter",
    "FusionSection",
    "KVCachePool",
    "KVCacheSection",
    "MemoryEstimate",
    "MemoryReport",
    "PeakMemory",
    "PlannerSection",
    "PoolExhaustedError",
    "PooledKVCache",
    "PruningSection",
    "QuantizationSection",
    "RecoverySection",
    "VramOptimizationConfig",
    "calibration_ids",
    "estimate",
    "generate_many",
    "memory_report",
    "optimize",
    "track_peak_memory",
]
