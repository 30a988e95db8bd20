"""``HfVramQuantizer``: runs the hf_vram pipeline inside ``from_pretrained``.

Before weights load, the quantization stage swaps empty quantized layers into the meta model (each with a meta
``weight`` placeholder when the checkpoint is float). While loading, Transformers hands every float weight of
those layers to ``HfVramQuantizeOp``, which returns the quantized buffers; the float tensor is dropped right away,
so peak memory stays near the quantized size. After loading, every buffer is checked to have arrived.
Pre-quantized checkpoints (``save_pretrained`` output) load straight into the buffers, with no re-quantization.

Transformers' registry builds it through ``hf_vram.hf.registration.build_quantizer``, which imports this module when
``from_pretrained`` first asks for it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from hf_vram import pipeline
from hf_vram.config import VramOptimizationConfig
from hf_vram.fusion import fuse_model
from hf_vram.hf.bnb_backend import BitsAndBytesDelegate
from hf_vram.hf.integrity import check_quantized_dtypes, verify_folder
from hf_vram.hf.serialization import install_save_hooks
from hf_vram.kvcache.layer_widths import counted_width
from hf_vram.pruning import build_pruned_skeleton
from hf_vram.pruning.sparsity import check_block_sparse
from hf_vram.quant.apply import QUANTIZED_MODULES, build_skeleton, dequantize_model, finish_loading


class HfVramQuantizeOp(ConversionOps):
    """Per-tensor conversion on load: float weight in, the layer's quantized buffers out."""

    def __init__(self, quantizer: HfVramQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rpartition(".")[0]
        layer = model.get_submodule(module_name)
        if getattr(layer, "transposed_source", False):
            value = value.t()
        tensors = layer.quantize_weight(value)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)  # the placeholder is served by the buffers below
        return {f"{module_name}.{name}": tensor for name, tensor in tensors.items()}


class HfVramQuantizer(BitsAndBytesDelegate, HfQuantizer):
    requires_calibration = False
    required_packages = ["torch"]

    def __init__(self, quantization_config: VramOptimizationConfig, **kwargs) -> None:
        # The stages record their decisions in the config's state: they work on a copy, so the user's object stays
        # as given; the copy becomes ``model.config.quantization_config``.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.plan = None
        section = self.quantization_config.quantization
        self.delegate = None
        if section.enabled and section.backend == "bitsandbytes":
            self._init_delegate(section, self.pre_quantized)

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values() and not self.pre_quantized:
            raise ValueError(
                "hf_vram: quantizing while offloading to disk would store float values as int8 zeros (a Transformers "
                "limitation); load without disk offload, save_pretrained, then load that saved folder with offload."
            )

    def preprocess_model(self, model, dtype=None, device_map=None, **kwargs):
        # Transformers consumes ``dtype`` here and does not pass it on to the hook below, which needs it: an int8
        # embedding must return rows in the dtype the model is loaded in (bf16 LayerNorms read them).
        self.load_dtype = dtype
        if device_map is None:
            # Transformers 5.25 kernelizes the model (hub kernels, on by default) before the after-loading hook,
            # on the device of its first parameter, which here is still a meta placeholder that hook removes
            # ("Unsupported device type 'meta'"); without a device map the model loads, and runs, on the CPU.
            # With one, Transformers takes the device from the map itself.
            model._kernels_device = "cpu"
        kwargs["device_map"] = device_map
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs) -> None:
        dtype = dtype or getattr(self, "load_dtype", None)
        if self.delegate is not None:
            return self._bnb_before_loading(model, dtype=dtype, **kwargs)
        folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if self.pre_quantized and folder.is_dir():
            verify_folder(folder)  # truncated/corrupted/missing files are refused before anything loads
        if self._quantize_after_load:
            return  # scoring and calibration need the float model: it loads as float and is optimized after loading
        if self.quantization_config.pruning.enabled:
            build_pruned_skeleton(model, self.quantization_config.pruning)
        if self.quantization_config.fusion.enabled:
            fuse_model(model, self.quantization_config.fusion)
        section = self.quantization_config.quantization
        if not section.enabled:
            return
        placeholder = None if self.pre_quantized else (dtype or torch.float32)
        self.plan = build_skeleton(model, section, placeholder_dtype=placeholder, float_dtype=dtype)
        if self.pre_quantized and folder.is_dir():
            check_quantized_dtypes(model, folder)

    @property
    def _quantize_after_load(self) -> bool:
        config = self.quantization_config
        planning = config.planner.enabled and config.planner.plan is None
        choosing = counted_width(config.kv_cache) is not None  # int8 (int4) K/V layers measured on the float model
        needs_float = (
            config.quantization.calibration != "none" or config.pruning.enabled or config.fusion.enabled or planning or choosing
        )
        return not self.pre_quantized and needs_float

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self._quantize_after_load:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QUANTIZED_MODULES) and tensor_name == "weight"

    def get_quantize_ops(self) -> HfVramQuantizeOp:
        return HfVramQuantizeOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.delegate is not None:
            model = self._bnb_after_loading(model, **kwargs)
            install_save_hooks(model)
            pipeline.finish(model, self.quantization_config)
            return model
        if self._quantize_after_load:
            self.plan = pipeline.apply(model, self.quantization_config)
        else:
            finish_loading(model)
            check_block_sparse(model)
        install_save_hooks(model)
        pipeline.finish(model, self.quantization_config)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Quantized layers train through LoRA adapters (hf_vram.add_lora); their int codes stay frozen.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # With no quantization (pruned/fused float models) every weight is an ordinary parameter: full fine-tuning.
        return self.delegate is None and not self.quantization_config.quantization.enabled

    @property
    def is_compileable(self) -> bool:
        # Every hf_vram layer calls its kernels through torch custom ops (hf_vram.kernels.ops): fullgraph-compilable.
        # bitsandbytes' layers are not ours to promise.
        return self.delegate is None

    @property
    def quantized_element_size(self) -> float:
        if self.delegate is not None:
            return self.delegate.quantized_element_size
        return 0.5 if self.quantization_config.quantization.scheme == "int4" else 1.0

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None) if dtype != "auto" else None
        return dequantize_model(model, dtype if isinstance(dtype, torch.dtype) else torch.float32)
