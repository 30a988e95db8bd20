"""Quantized replacements for ``nn.Linear`` (and GPT-2's ``Conv1D``).

Each layer keeps ``in_features``/``out_features`` like ``nn.Linear`` (PEFT and Trainer tooling read them), stores
its weight in the saved format of ``hf_vram.quant.schemes`` as persistent buffers, and calls a kernel chosen by
``hf_vram.kernels.dispatch``. The saved tensor names (``qweight``, ``scales``, ``scales_zeros``) differ from
``weight`` on purpose: a plain Transformers load without ``import hf_vram`` then reports every quantized weight
as MISSING instead of silently casting int8 codes into float weights.

While a model loads, a layer also carries a meta ``weight`` placeholder so that Transformers routes the float
checkpoint tensor to hf_vram's quantize op (``hf_vram.hf.quantizer``); the placeholder is removed after loading.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_vram.kernels import cpu as cpu_kernels
from hf_vram.kernels import ops
from hf_vram.kernels.reference import w8a8_matmul_reference
from hf_vram.quant import schemes
from hf_vram.quant.placeholder import LoadPlaceholderMixin
from hf_vram.quant.state import Int8RowsMixin, QuantStateMixin

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_compute_dtype(name: str) -> torch.dtype | None:
    """``auto`` -> None (the dispatcher decides per device); otherwise the named dtype."""
    return None if name == "auto" else _DTYPES[name]


class _FrozenQuantMatmul(torch.autograd.Function):
    """``y = x W^T`` through the layer's packed kernel, with the gradient reaching ``x`` (never the frozen codes).

    torch's packed int8/int4 kernels have no autograd formula, so training adapters (LoRA) on top of a quantized
    layer needs this: the backward dequantizes the weight for the one layer being differentiated, then drops it.
    """

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.x_dtype = layer, x2d.dtype
        with torch.no_grad():
            return layer._matmul(x2d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight = ctx.layer._dequantize().to(grad_out.dtype)
        return (grad_out @ weight).to(ctx.x_dtype), None


class QuantLinear(QuantStateMixin, LoadPlaceholderMixin, nn.Module):
    """Base of hf_vram's quantized linear layers: shape bookkeeping, bias, placeholder, forward plumbing."""

    scheme: str = ""
    quantized_buffers: tuple[str, ...] = ()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        compute_dtype: str = "auto",
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        calibrated: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self._compute_dtype = resolve_compute_dtype(compute_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # AWQ-style per-input-channel scales: the stored weight is W * act_scales, inputs are divided by them.
        if calibrated:
            self.register_buffer("act_scales", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.act_scales = None

    @property
    def matmul_dtype(self) -> torch.dtype | None:
        """The activation dtype of the quantized matmul; None: the dispatcher chooses per device (``auto``)."""
        return self._compute_dtype

    # -- loading -----------------------------------------------------------------------------------------------
    def _float_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def quantize_weight(self, weight: torch.Tensor, act_scales: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The saved buffers for a float weight ``[out, in]`` (names relative to this module)."""
        weight = weight.contiguous()  # a transposed Conv1D weight would give strided codes the packed kernels reject
        if act_scales is None:
            return self._quantize(weight)
        scaled = weight.detach().float() * act_scales.float()[None, :]
        return {**self._quantize(scaled), "act_scales": act_scales.float().clone()}

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            setattr(self, name, value)
        self.prepare_for_device()

    def prepare_for_device(self) -> None:
        """Make the weight kernel-ready for the current device (layout, contiguity, alignment); idempotent."""

    def _prepare_outside_compile(self) -> None:
        """Called by every forward: a pointer/layout check once prepared. A compiled graph runs on weights prepared
        before tracing (the layout may not change inside a graph), so it is skipped while compiling."""
        if not torch.compiler.is_compiling():
            self.prepare_for_device()

    # -- the saved layout, for serialization and interop ---------------------------------------------------------
    # Rows (output channels) are independent in every hf_vram format; ``row_axes`` says along which axis of each
    # saved buffer they lie, so a fused projection can be split back into its parts without reading private state.
    row_axes: dict[str, int] = {}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The quantized buffers in the saved layout (whatever layout the kernels hold them in right now)."""
        return {name: getattr(self, name) for name in self.quantized_buffers}

    def row_slice(self, start: int, stop: int) -> QuantLinear:
        """A layer of the same scheme holding rows ``start:stop`` of this one, in the saved layout (shares storage)."""
        piece = copy.copy(self)
        piece._buffers = dict(self._buffers)
        piece._parameters = dict(self._parameters)
        piece.out_features = stop - start
        for name, tensor in self.saved_tensors().items():
            piece._buffers[name] = tensor.narrow(self.row_axes[name], start, stop - start)
        piece._reset_kernel_state()
        if self.bias is not None:
            piece._parameters["bias"] = nn.Parameter(self.bias.detach()[start:stop], requires_grad=False)
        return piece

    def _reset_kernel_state(self) -> None:
        """After ``row_slice``: the copy holds the saved layout and no kernel-owned state of the original."""

    # -- inference ---------------------------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self._dequantize().float()
        if self.act_scales is not None:
            w = w / self.act_scales.float()[None, :]
        return w.to(dtype)

    def _dequantize(self) -> torch.Tensor:
        return self.dequantize_from({name: getattr(self, name) for name in self.quantized_buffers})

    def dequantize_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 ``[out, in]`` from saved-format tensors (before any activation scale)."""
        raise NotImplementedError

    def simulate(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """What this scheme computes for float32 inputs ``x [M, in]``, by the reference math (for calibration)."""
        return x @ self.dequantize_from(tensors).t()

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.act_scales is not None:
            x = x / self.act_scales.to(x.dtype)
        x2d = x.reshape(-1, shape[-1])
        y = _FrozenQuantMatmul.apply(x2d, self) if x2d.requires_grad and torch.is_grad_enabled() else self._matmul(x2d)
        return y.reshape(*shape[:-1], self.out_features)

    def to_float_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (powers ``model.dequantize()``)."""
        w = self.dequantize_weight(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype, device=w.device)
        linear.weight.data.copy_(w)
        if self.bias is not None:
            linear.bias.data.copy_(self.bias.detach().to(dtype))
        return linear

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bias={self.bias is not None}, scheme={self.scheme}"


class Int8Linear(Int8RowsMixin, QuantLinear):
    """int8 weight-only, symmetric per output channel."""

    scheme = "int8"
    quantized_buffers = ("qweight", "scales")
    row_axes = {"qweight": 0, "scales": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool, *, device=None, **kwargs) -> None:
        super().__init__(in_features, out_features, bias, device=device, **kwargs)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self._init_kernel_copy()

    def _reset_kernel_state(self) -> None:
        self._init_kernel_copy()

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, s = schemes.quantize_int8(weight)
        return {"qweight": q, "scales": s}

    def dequantize_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return schemes.dequantize_int8(tensors["qweight"], tensors["scales"])

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        self._prepare_outside_compile()
        return ops.int8_linear(x2d, self.qweight, self.scales, self._kernel_copy.tensor, self.bias, self._compute_dtype)


class Int4Linear(QuantLinear):
    """int4 weight-only, group-wise along the input dimension (asymmetric by default)."""

    scheme = "int4"
    quantized_buffers = ("qweight", "scales_zeros")
    row_axes = {"qweight": 0, "scales_zeros": 1}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        group_size: int = 128,
        symmetric: bool = False,
        scale_search: str = "clip",
        scale_dtype: torch.dtype = schemes.INT4_SCALE_DTYPE,
        device=None,
        **kwargs,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, **kwargs)
        self.group_size = group_size
        self.symmetric = symmetric
        self.scale_search = scale_search
        self.padded_in_features = schemes.padded_in_features(in_features, group_size)
        self.layout = "packed"  # the saved layout; CPU kernels switch it to cpu_kernels.CPU_INT4_LAYOUT
        self.register_buffer("qweight", torch.empty(out_features, self.padded_in_features // 2, dtype=torch.uint8, device=device))
        n_groups = self.padded_in_features // group_size
        self.register_buffer("scales_zeros", torch.empty(n_groups, out_features, 2, dtype=scale_dtype, device=device))

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, sz = schemes.quantize_int4(weight, self.group_size, self.symmetric, self.scale_search)
        return {"qweight": packed, "scales_zeros": sz}

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layout = "packed"
        super().load_quantized(tensors)

    def prepare_for_device(self) -> None:
        on_cpu = self.qweight.device.type == "cpu"
        if on_cpu and self.layout == "packed" and cpu_kernels.cpu_int4_supported(self.out_features, self.padded_in_features):
            codes = schemes.unpack_int4(self.qweight)
            self.qweight = cpu_kernels.int4_to_cpu_layout(codes)
            self.layout = cpu_kernels.CPU_INT4_LAYOUT
        elif not on_cpu and self.layout == cpu_kernels.CPU_INT4_LAYOUT:
            self.qweight = self.saved_tensors()["qweight"]
            self.layout = "packed"

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        qweight = self.qweight
        if self.layout == cpu_kernels.CPU_INT4_LAYOUT:
            qweight = schemes.pack_int4(cpu_kernels.int4_from_cpu_layout(qweight.cpu())).to(qweight.device)
        return {"qweight": qweight, "scales_zeros": self.scales_zeros}

    def _reset_kernel_state(self) -> None:
        self.layout = "packed"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "packed":
            destination[prefix + "qweight"] = self.saved_tensors()["qweight"]

    def _dequantize(self) -> torch.Tensor:
        if self.layout == cpu_kernels.CPU_INT4_LAYOUT:  # straight from the kernel layout (training's backward)
            w = cpu_kernels.int4_dequantize_cpu_layout(self.qweight, self.scales_zeros, torch.float32)
            return w[:, : self.in_features]
        return self.dequantize_from(self.saved_tensors())

    def dequantize_from(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return schemes.dequantize_int4(tensors["qweight"], tensors["scales_zeros"], self.in_features)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        self._prepare_outside_compile()
        pad = self.padded_in_features - self.in_features
        if pad:
            x2d = F.pad(x2d, (0, pad))
        return ops.int4_linear(x2d, self.qweight, self.layout, self.scales_zeros, self.group_size, self.bias, self._compute_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, symmetric={self.symmetric}"


class W8A8Linear(Int8Linear):
    """int8 weights (the int8 format, saved identically) times int8 activations quantized per token at run time.

    On the CPU the codes live inside an FBGEMM packed weight (the ``qweight`` buffer is then empty, so the codes
    are held once; ``memory_report`` counts the packed bytes through ``extra_storage``); saving unpacks them.
    A compiled graph reaches the packed weight through an integer handle (``ops.PACKED_WEIGHTS``), kept valid by
    ``prepare_for_device``, which every eager forward runs.
    """

    scheme = "w8a8"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed = None
        self._packed_handle = 0

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        self._set_packed(None)  # new codes: the packed copy of the old ones must not survive
        super().load_quantized(tensors)

    def _set_packed(self, packed) -> None:
        if self._packed_handle:
            ops.release_packed(self._packed_handle)
        self._packed = packed
        self._packed_handle = ops.register_packed(self, packed) if packed is not None else 0

    def prepare_for_device(self) -> None:
        on_cpu = self.qweight.device.type == "cpu"
        if on_cpu and self._packed is None:
            self._set_packed(cpu_kernels.w8a8_pack(self.qweight, self.scales))
            self.qweight = torch.empty(0, dtype=torch.int8)
        elif not on_cpu and self._packed is not None:
            self.qweight = cpu_kernels.w8a8_unpack(self._packed).to(self.scales.device)
            self._set_packed(None)
        elif self._packed is not None and ops.PACKED_WEIGHTS.get(self._packed_handle) is not self._packed:
            self._packed_handle = ops.register_packed(self, self._packed)  # a deep copy carries the original's handle

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        codes = cpu_kernels.w8a8_unpack(self._packed) if self._packed is not None else self.qweight
        return {"qweight": codes, "scales": self.scales}

    def _reset_kernel_state(self) -> None:
        super()._reset_kernel_state()
        self._packed, self._packed_handle = None, 0

    def extra_storage(self) -> list[tuple[str, str, int]]:
        return [("quantized weights", "int8", cpu_kernels.w8a8_packed_bytes(self._packed))] if self._packed is not None else []

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.saved_tensors()["qweight"]

    def _dequantize(self) -> torch.Tensor:
        return self.dequantize_from(self.saved_tensors())

    def simulate(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return w8a8_matmul_reference(x, tensors["qweight"], tensors["scales"])

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        self._prepare_outside_compile()
        return ops.w8a8_linear(x2d, self.qweight, self.scales, self.bias, self._packed_handle)


SCHEME_LAYERS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}
