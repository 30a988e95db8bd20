"""The ``weight`` that hf_vram's quantized modules show to Transformers.

While a float checkpoint loads, a meta ``weight`` parameter of the float shape makes Transformers route that
tensor to the quantize op. Outside loading, ``weight`` is an empty tensor marked as initialized, because model
``_init_weights`` functions (GPT-2's, for one) touch ``module.weight`` of every projection; the marker makes
Transformers' init helpers skip it instead of failing or allocating a float weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LoadPlaceholderMixin:
    """For ``nn.Module`` subclasses that hold their weight in quantized buffers."""

    def _float_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def add_load_placeholder(self, dtype: torch.dtype) -> None:
        # Straight into the registry: ``register_parameter`` refuses a name that a class property already uses.
        self._parameters["weight"] = nn.Parameter(
            torch.empty(*self._float_shape(), dtype=dtype, device="meta"), requires_grad=False
        )

    def drop_load_placeholder(self) -> None:
        self._parameters.pop("weight", None)

    @property
    def weight(self) -> torch.Tensor:
        placeholder = self._parameters.get("weight")
        if placeholder is not None:
            return placeholder
        empty = torch.empty(0, device=self._buffers["qweight"].device)
        empty._is_hf_initialized = True
        return empty
