"""Fused projections: q, k and v (and gate and up) as one matmul, without rewriting the model's forward.

The attention (or MLP) module gets one ``nn.Linear`` holding the concatenated rows (``qkv_proj`` /
``gate_up_proj``); its old ``q_proj``/``k_proj``/``v_proj`` become ``ProjectionSlice`` modules without weights.
The first slice called on an input runs the fused matmul once and the others take their rows of that result, so
the model's own forward (RoPE, q/k norms, GQA views, OPT's scaling) runs unchanged. A slice called on another input
computes its rows alone, which is still correct. The fused layer is an ordinary ``nn.Linear`` until the quantization
stage turns it into one quantized layer; its split points are recorded on the slices (``rows``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# Module classes whose projections may be fused: (names of the projections called on the same input, fused name).
FUSABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "LlamaAttention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "MistralAttention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "Qwen2Attention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "Qwen3Attention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "GemmaAttention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "OPTAttention": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    "BertSelfAttention": (("query", "key", "value"), "qkv_proj"),
    "LlamaMLP": (("gate_proj", "up_proj"), "gate_up_proj"),
    "MistralMLP": (("gate_proj", "up_proj"), "gate_up_proj"),
    "Qwen2MLP": (("gate_proj", "up_proj"), "gate_up_proj"),
    "Qwen3MLP": (("gate_proj", "up_proj"), "gate_up_proj"),
    "GemmaMLP": (("gate_proj", "up_proj"), "gate_up_proj"),
}
# Already fused by the architecture itself, or containers whose projections live in a child listed above.
NATIVE = {"Phi3Attention", "Phi3MLP", "GPT2Attention", "BertAttention"}


class _SharedOutput:
    """The fused result for the input most recently seen, until every slice has taken its rows."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.taken: set[int] = set()


class ProjectionSlice(nn.Module):
    """Rows ``rows`` of a fused projection owned by the parent module (no weights of its own)."""

    def __init__(self, parent: nn.Module, fused_name: str, index: int, rows: tuple[int, int], shared: _SharedOutput) -> None:
        super().__init__()
        self._parent = [parent]  # a list, so the parent is not registered as a child (no cycle in modules())
        self.fused_name = fused_name
        self.index = index
        self.rows = rows
        self._shared = shared
        self.in_features = None
        self.out_features = rows[1] - rows[0]

    @property
    def fused(self) -> nn.Module:
        return getattr(self._parent[0], self.fused_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        start, stop = self.rows
        if shared.input is not x or self.index in shared.taken:
            shared.input, shared.output, shared.taken = x, self.fused(x), set()
        shared.taken.add(self.index)
        out = shared.output[..., start:stop]
        if len(shared.taken) == shared.count:  # every slice served: drop the references
            shared.input = shared.output = None
            shared.taken = set()
        return out

    def extra_repr(self) -> str:
        return f"{self.fused_name}[{self.rows[0]}:{self.rows[1]}]"


def fuse_projections(module: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Concatenate ``names`` (nn.Linear on the same input) into ``module.<fused_name>`` and slice it back."""
    layers = [getattr(module, n) for n in names]
    if not all(type(layer) is nn.Linear for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise TypeError(
            f"hf_vram fusion: {type(module).__name__}.{names} are {kinds}, not float nn.Linear; fusion runs before "
            "quantization (the pipeline's order); fuse the float model."
        )
    in_f = layers[0].in_features
    if any(layer.in_features != in_f for layer in layers):
        raise ValueError(f"hf_vram fusion: {type(module).__name__}.{names} take inputs of different sizes; cannot fuse.")
    has_bias = [layer.bias is not None for layer in layers]
    weight = torch.cat([layer.weight.data for layer in layers])
    fused = nn.Linear(in_f, weight.shape[0], bias=any(has_bias), device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=layers[0].weight.requires_grad)
    if any(has_bias):
        parts = [layer.bias.data if layer.bias is not None else weight.new_zeros(layer.out_features) for layer in layers]
        fused.bias = nn.Parameter(torch.cat(parts), requires_grad=layers[0].weight.requires_grad)
    setattr(module, fused_name, fused)
    shared = _SharedOutput(len(names))
    start = 0
    for i, (name, layer) in enumerate(zip(names, layers, strict=True)):
        piece = ProjectionSlice(module, fused_name, i, (start, start + layer.out_features), shared)
        piece.in_features = in_f
        setattr(module, name, piece)
        start += layer.out_features
