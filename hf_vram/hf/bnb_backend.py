"""``quantization.backend: bitsandbytes``: NF4 and LLM.int8 in bitsandbytes' own format, behind the hf_vram config.

hf_vram does not re-implement bitsandbytes: this quantizer builds the matching ``BitsAndBytesConfig`` and hands
every loading hook to Transformers' own bitsandbytes quantizer, so checkpoints are bitsandbytes' format (readable
by any bitsandbytes user) while config.json records the hf_vram config. The in-memory door
(``hf_vram.optimize``) is not offered for this backend: bitsandbytes quantizes while weights load.

CPU families: on CPUs with AVX512-BF16 (Intel Xeon), bitsandbytes' ``Linear4bit`` repacks its weight at the first
forward into a blocked layout (``_convert_weight_packed_for_cpu``) for a fused bf16 kernel. That layout needs
``out_features % 32 == 0`` and an input size that is a whole number of quantization blocks; other layers fail
there (``shape '[64, 1]' is invalid``). After loading, such layers are told to keep bitsandbytes' generic CPU path
(``support_avx512bf16_for_cpu = False``), which every CPU runs; layers that fit keep the fast path.
"""

from __future__ import annotations

from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

from hf_vram.config import QuantizationSection

_FORWARDED = (
    "validate_environment",
    "update_device_map",
    "adjust_max_memory",
    "param_needs_quantization",
    "get_quantize_ops",
    "get_load_operations",
    "_dequantize",
)


def bitsandbytes_config(section: QuantizationSection) -> BitsAndBytesConfig:
    compute = {"auto": "float32"}.get(section.compute_dtype, section.compute_dtype)
    skip = section.modules_to_not_convert
    if section.scheme == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


class BitsAndBytesDelegate:
    """Mixin for HfVramQuantizer: forwards the loading hooks to Transformers' bitsandbytes quantizer."""

    def _init_delegate(self, section: QuantizationSection, pre_quantized: bool) -> None:
        bnb_config = bitsandbytes_config(section)
        cls = Bnb4BitHfQuantizer if bnb_config.load_in_4bit else Bnb8BitHfQuantizer
        self.delegate = cls(bnb_config, pre_quantized=pre_quantized)
        self.serialized_names = self.delegate.serialized_names
        for name in _FORWARDED:
            setattr(self, name, getattr(self.delegate, name))

    def _bnb_before_loading(self, model, **kwargs) -> None:
        self.delegate._process_model_before_weight_loading(model, **kwargs)
        model.is_loaded_in_4bit = self.delegate.quantization_config.load_in_4bit
        model.is_loaded_in_8bit = self.delegate.quantization_config.load_in_8bit

    def _bnb_after_loading(self, model, **kwargs):
        model = self.delegate._process_model_after_weight_loading(model, **kwargs)
        keep_unfit_layers_off_cpu_packing(model)
        return model


# bitsandbytes' blocked CPU layout groups output rows in blocks of this many (its ``block_n`` default).
CPU_PACK_BLOCK_N = 32


def fits_cpu_packing(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether ``_convert_weight_packed_for_cpu`` can repack a 4-bit weight of this shape."""
    return out_features % CPU_PACK_BLOCK_N == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def keep_unfit_layers_off_cpu_packing(model) -> list[str]:
    """Route 4-bit layers that the AVX512-BF16 packed layout cannot hold to the generic path; returns their names."""
    routed = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            continue
        out_features, in_features = state.shape
        if not fits_cpu_packing(out_features, in_features, state.blocksize):
            module.support_avx512bf16_for_cpu = False
            routed.append(name)
    return routed
