"""Quantization state that keeps its saved dtype when the model's float dtype changes.

``model.to(torch.bfloat16)`` (and ``.half()``, ``.float()``) casts every floating buffer. For a quantized layer
that would round its float32 per-channel scales to bfloat16, so the layer would no longer compute what was saved
and the next save would write different numbers. Layers using this mixin let the cast reach their float outputs
(biases, the embedding's output dtype) and move, but never re-type, the buffers named in ``kept_dtype_buffers``.
"""

from __future__ import annotations

import torch

from hf_vram.kernels.preconditions import kernel_ready

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


class KernelCopy:
    """A tensor converted once for a kernel (float32 scales in bfloat16), rebuilt when its source is replaced,
    changed in place or moved.

    torch's packed int8 CPU kernel wants its scales in the activation dtype: converting them per call costs a kernel
    launch per matmul, and inside a compiled graph inductor's lowering of that kernel fails on scales converted in
    the graph. So layers keep this copy, refreshed by ``prepare_for_device`` (every eager forward, a pointer check);
    a compiled graph reads ``tensor`` as it was when tracing began. It is not a buffer: never saved, and counted by
    ``extra_storage`` in the memory report.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.tensor: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._version = -1

    def is_current(self, source: torch.Tensor) -> bool:
        """Whether ``tensor`` is the copy of ``source`` as it is now (same tensor, unchanged in place)."""
        return self.tensor is not None and self._source is source and self._version == _version_of(source)

    def of(self, source: torch.Tensor) -> torch.Tensor:
        version = _version_of(source)
        fresh = self.tensor is not None and self._source is source and self._version == version
        if not fresh or self.tensor.device != source.device:
            self.tensor = source.to(self.dtype)
            self._source, self._version = source, version
        return self.tensor

    @property
    def nbytes(self) -> int:
        """Bytes of the copy; 0 when the source already had the dtype (``to`` then returns the source itself)."""
        if self.tensor is None or self.tensor is self._source:
            return 0
        return self.tensor.numel() * self.tensor.element_size()


def _version_of(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place outside it)
        return 0


class Int8RowsMixin:
    """int8 rows ``qweight`` with per-row ``scales``, read by torch's packed int8 kernel (``Int8Linear``, and
    ``Int8Embedding`` whose rows a tied head multiplies): both made kernel-ready in one place."""

    def _init_kernel_copy(self) -> None:
        self._kernel_copy = KernelCopy(torch.bfloat16)  # the scales in the packed kernel's activation dtype
        self._ready_qweight: torch.Tensor | None = None  # the rows last found kernel-ready

    def prepare_for_device(self) -> None:
        # Every forward calls this, so a layer already prepared returns after two identity checks and a version
        # read: the rows are the very tensor found aligned last time (moving or reloading the layer replaces it)
        # and the scales' copy is current. Else a memory-mapped checkpoint tensor (8-byte offset) is copied once
        # into an aligned allocation.
        qweight, scales = self._buffers["qweight"], self._buffers["scales"]
        if qweight is self._ready_qweight and self._kernel_copy.is_current(scales):
            return
        if qweight.device.type != "meta":
            ready = kernel_ready(qweight)
            if ready is not qweight:
                self.qweight = ready
            self._ready_qweight = ready
            self._kernel_copy.of(scales)

    def extra_storage(self) -> list[tuple[str, str, int]]:
        """``(kind, dtype, bytes)`` of storage the memory report cannot see as a parameter or buffer."""
        nbytes = self._kernel_copy.nbytes
        return [("scales", str(self._kernel_copy.dtype).removeprefix("torch."), nbytes)] if nbytes else []

    def kernel_copy_bytes(self) -> int:
        """Bytes ``prepare_for_device`` will add (the scales' kernel copy), known before it runs, even on the meta
        device: what the planner and the estimate count beside the parameters and buffers."""
        return 0 if self.scales.dtype == self._kernel_copy.dtype else self.scales.numel() * self._kernel_copy.dtype.itemsize
