"""Weight sparsity with honest byte accounting: unstructured magnitude masks and compact 16x16 block sparsity.

An unstructured mask zeroes weights but a dense tensor of zeros costs the same bytes, so it is reported as
saving nothing. Block sparsity drops whole 16x16 blocks and stores the rest compactly (BSR: kept blocks plus
int32 row pointers and column indices), which does shrink memory; ``sparsity_report`` counts the real bytes of
both forms. The CPU multiplies BSR weights with torch's sparse kernels, slower than dense ones (see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

BLOCK = 16


class BlockSparseLinear(nn.Module):
    """A linear layer whose weight keeps only some 16x16 blocks, stored in block-sparse-row form."""

    def __init__(self, in_features: int, out_features: int, nnz_blocks: int, bias: bool, dtype=None, device=None) -> None:
        super().__init__()
        if in_features % BLOCK or out_features % BLOCK:
            raise ValueError(f"hf_vram sparsity: block16 needs both dims divisible by {BLOCK}, got {out_features}x{in_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.empty(nnz_blocks, BLOCK, BLOCK, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("crow_indices", torch.empty(out_features // BLOCK + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.empty(nnz_blocks, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> BlockSparseLinear:
        """``weight`` [out, in]; ``keep`` a bool [out/16, in/16] map of the blocks to store."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, int(keep.sum()), bias is not None, dtype=weight.dtype, device=weight.device)
        blocks = weight.view(out_f // BLOCK, BLOCK, in_f // BLOCK, BLOCK).transpose(1, 2)
        layer.values.data.copy_(blocks[keep])
        counts = keep.sum(1).to(torch.int32)
        layer.crow_indices.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)]))
        layer.col_indices.copy_(keep.nonzero()[:, 1].to(torch.int32))
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def sparse_weight(self) -> torch.Tensor:
        # Indices are checked once after loading (``check_indices``), not on every call.
        return torch.sparse_bsr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            size=(self.out_features, self.in_features),
            check_invariants=False,
        )

    def check_indices(self, name: str = "") -> None:
        """Refuse block indices that would make torch's sparse kernels read out of bounds (corrupted files)."""
        crow, col, nnz = self.crow_indices.long(), self.col_indices.long(), self.values.shape[0]
        ok = (
            crow.numel() == self.out_features // BLOCK + 1
            and crow[0].item() == 0
            and crow[-1].item() == nnz
            and bool((crow[1:] >= crow[:-1]).all())
            and col.numel() == nnz
            and (nnz == 0 or (col.min().item() >= 0 and col.max().item() < self.in_features // BLOCK))
        )
        if not ok:
            raise ValueError(
                f"hf_vram sparsity: the block indices of {name or 'a block-sparse layer'} are inconsistent; the "
                "checkpoint is corrupted. Save the model again from its source."
            )

    def dense_weight(self) -> torch.Tensor:
        return self.sparse_weight().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.values.dtype)
        y = (self.sparse_weight() @ flat.T).T.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        total = (self.out_features // BLOCK) * (self.in_features // BLOCK)
        return f"in={self.in_features}, out={self.out_features}, blocks kept={self.values.shape[0]}/{total}"


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight.data.t() if isinstance(layer, Conv1D) else layer.weight.data


def unstructured_mask_(layer: nn.Module, ratio: float) -> None:
    """Zero the ``ratio`` smallest-magnitude weights of one layer, in place (memory is unchanged)."""
    w = layer.weight.data
    k = int(ratio * w.numel())
    if k == 0:
        return
    threshold = w.abs().flatten().kthvalue(k).values
    w.masked_fill_(w.abs() <= threshold, 0)


def block_sparse_layer(layer: nn.Module, ratio: float) -> BlockSparseLinear | None:
    """A ``BlockSparseLinear`` without the ``ratio`` lowest-norm 16x16 blocks; None when the shape does not tile."""
    weight = _dense_weight(layer)
    out_f, in_f = weight.shape
    if out_f % BLOCK or in_f % BLOCK:
        return None
    norms = weight.float().view(out_f // BLOCK, BLOCK, in_f // BLOCK, BLOCK).pow(2).sum((1, 3))
    drop = int(ratio * norms.numel())
    keep = torch.ones_like(norms, dtype=torch.bool)
    if drop:
        keep.view(-1)[torch.argsort(norms.flatten(), stable=True)[:drop]] = False
    return BlockSparseLinear.from_dense(weight, layer.bias.data if layer.bias is not None else None, keep)


def sparsify(model: nn.Module, targets: dict[str, nn.Module], kind: str, ratio: float) -> dict[str, int]:
    """Apply ``kind`` sparsity to ``targets`` (name -> layer); returns kept-block counts of block-sparse layers."""
    blocks: dict[str, int] = {}
    for name, layer in targets.items():
        if kind == "unstructured":
            unstructured_mask_(layer, ratio)
        elif kind == "block16":
            new = block_sparse_layer(layer, ratio)
            if new is not None:
                model.set_submodule(name, new)
                blocks[name] = int(new.values.shape[0])
    return blocks


def block_sparse_skeleton(model: nn.Module, blocks: dict[str, int]) -> None:
    """Replace the named layers of a meta model with empty ``BlockSparseLinear`` of the saved block counts."""
    for name, nnz in blocks.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"hf_vram sparsity: the saved plan names {name!r}, which this model does not have.") from err
        out_f, in_f = _dense_weight(layer).shape
        new = BlockSparseLinear(in_f, out_f, nnz, layer.bias is not None, dtype=layer.weight.dtype, device="meta")
        model.set_submodule(name, new)


def check_block_sparse(model: nn.Module) -> None:
    """After loading: every block-sparse tensor arrived from the checkpoint and its indices are valid."""
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseLinear):
            for tensor_name in ("values", "crow_indices", "col_indices"):
                tensor = getattr(module, tensor_name)
                if tensor.device.type == "meta" or not getattr(tensor, "_is_hf_initialized", False):
                    raise ValueError(
                        f"hf_vram sparsity: {name}.{tensor_name} was not in the checkpoint; the files are truncated "
                        "or were written by another config. Save the model again."
                    )
            module.check_indices(name)


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Real bytes of sparse layers against the dense layers they replace, and the zero fraction of dense ones."""
    stored = dense = 0
    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            stored += sum(t.numel() * t.element_size() for t in (module.values, module.crow_indices, module.col_indices))
            dense += module.in_features * module.out_features * module.values.element_size()
    return {"block_sparse_bytes": stored, "dense_equivalent_bytes": dense, "bytes_saved": dense - stored}


__all__ = [
    "BLOCK",
    "BlockSparseLinear",
    "block_sparse_skeleton",
    "check_block_sparse",
    "sparsify",
    "sparsity_report",
    "unstructured_mask_",
]
