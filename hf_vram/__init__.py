"""hf_vram: cut the memory a Transformers language model needs, behind one config.

``import hf_vram`` registers the ``hf_vram`` quantization method with Transformers; it must run before
``from_pretrained`` of a model saved by hf_vram. It stays cheap (about the cost of importing Transformers itself):
the config classes load at once, the registration happens when Transformers' quantizer registry is first imported
(``from_pretrained`` does that; ``hf_vram.hf.registration``), and every other public name loads its module on first
use. The recovery names import the Trainer, PEFT and bitsandbytes, which take seconds and print warnings of their
own.
"""

from hf_vram._lazy import lazy_getattr
from hf_vram.config import (
    FusionSection,
    KVCacheSection,
    PlannerSection,
    PruningSection,
    QuantizationSection,
    RecoverySection,
    VramOptimizationConfig,
)
from hf_vram.hf.registration import install as _install_registration

__version__ = "0.1.0"

_install_registration()

# public name -> the module that defines it, imported on first access
_LAZY = {
    "calibration_ids": "hf_vram.data",
    "KVCachePool": "hf_vram.kvcache",
    "PooledKVCache": "hf_vram.kvcache",
    "PoolExhaustedError": "hf_vram.kvcache",
    "MemoryReport": "hf_vram.memory.report",
    "memory_report": "hf_vram.memory.report",
    "PeakMemory": "hf_vram.memory.tracker",
    "track_peak_memory": "hf_vram.memory.tracker",
    "optimize": "hf_vram.api",
    "MemoryEstimate": "hf_vram.planner",
    "estimate": "hf_vram.planner",
    "export": "hf_vram.interop",
    "ExportError": "hf_vram.interop",
    "load_compressed_tensors": "hf_vram.interop",
    **{
        name: "hf_vram.recovery"
        for name in ("DistillationCallback", "DistillationTrainer", "ProgressivePruningCallback", "add_lora", "load_lora_adapter")
    },
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DistillationCallback",
    "ExportError",
    "export",
    "load_compressed_tensors",
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
    "memory_report",
    "optimize",
    "track_peak_memory",
]
