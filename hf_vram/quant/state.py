"""Quantization state that keeps its saved dtype when the model's float dtype changes.

``model.to(torch.bfloat16)`` (and ``.half()``, ``.float()``) casts every floating buffer. For a quantized layer
that would round its float32 per-channel scales to bfloat16, so the layer would no longer compute what was saved
and the next save would write different numbers. Layers using this mixin let the cast reach their float outputs
(biases, the embedding's output dtype) and move, but never re-type, the buffers named in ``kept_dtype_buffers``.
"""

from __future__ import annotations

import torch

KEPT_DTYPE_BUFFERS = ("scales", "scales_zeros", "act_scales")


class QuantStateMixin:
    """For ``nn.Module`` subclasses holding quantization state in buffers (see module docstring)."""

    def _apply(self, fn, recurse: bool = True):
        before = {name: self._buffers[name] for name in KEPT_DTYPE_BUFFERS if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # the move without the cast
        self._follow_float_dtype(fn)
        return result

    def _follow_float_dtype(self, fn) -> None:
        """Hook for modules whose output dtype is a setting rather than a tensor (``Int8Embedding``)."""

    @staticmethod
    def _converted_dtype(fn, dtype: torch.dtype) -> torch.dtype:
        """The dtype ``fn`` (a ``Module._apply`` function) gives a float tensor of ``dtype``, found on an empty one."""
        try:
            return fn(torch.empty(0, dtype=dtype)).dtype
        except (RuntimeError, TypeError):
            return dtype
