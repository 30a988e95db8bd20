"""The teacher side of distillation: logits on the fly under ``no_grad``, or top-k logits cached on disk.

On the fly costs one teacher forward per step and no storage; the teacher may itself be an hf_vram int8 model to
halve its memory. For several epochs over the same data, ``TopKLogitCache`` stores the k largest logits and their
token ids per position (fp16 values, int32 ids: 6k bytes a token instead of 4 x vocab) in one safetensors file per
sequence, keyed by a hash of its tokens, so later epochs (in any order) skip the teacher.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def teacher_logits(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The teacher's logits for a batch, on the batch's device, with no autograd graph kept."""
    device = _device(teacher)
    mask = attention_mask.to(device) if attention_mask is not None else None
    was_training = teacher.training
    teacher.eval()
    try:
        logits = teacher(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False).logits
    finally:
        teacher.train(was_training)
    return logits.to(input_ids.device)


class TopKLogitCache:
    """Top-k teacher logits per batch on disk (safetensors), computed once and read back on later epochs."""

    def __init__(self, directory: str | Path, k: int = 64) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"hf_vram distillation: top_k={k!r} is invalid; use an int >= 1 (e.g. 64).")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.k = k
        self.hits = 0
        self.misses = 0

    def _path(self, row: torch.Tensor, mask: torch.Tensor | None) -> Path:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str((row.numel(), self.k)).encode())
        digest.update(row.detach().cpu().to(torch.int64).numpy().tobytes())
        if mask is not None:
            digest.update(mask.detach().cpu().to(torch.int8).numpy().tobytes())
        return self.directory / f"{digest.hexdigest()}.safetensors"

    def get(
        self, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [B, T, k], indices [B, T, k])``; rows are cached one by one, so shuffled batches still hit."""
        paths = [
            self._path(input_ids[b], None if attention_mask is None else attention_mask[b]) for b in range(input_ids.shape[0])
        ]
        rows: list[dict[str, torch.Tensor] | None] = [load_file(str(p)) if p.exists() else None for p in paths]
        missing = [b for b, row in enumerate(rows) if row is None]
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            mask = attention_mask[missing] if attention_mask is not None else None
            top = teacher_logits(teacher, input_ids[missing], mask).float().topk(self.k, dim=-1)
            for j, b in enumerate(missing):
                rows[b] = {
                    "values": top.values[j].to(torch.float16).cpu().contiguous(),
                    "indices": top.indices[j].to(torch.int32).cpu().contiguous(),
                }
                tmp = paths[b].with_suffix(".tmp")
                save_file(rows[b], str(tmp))
                tmp.replace(paths[b])  # atomic: a crash never leaves a half-written cache entry
        for path, row in zip(paths, rows, strict=True):
            if row["values"].shape != (input_ids.shape[1], self.k):
                raise ValueError(
                    f"hf_vram distillation: cached teacher logits {path} have shape {tuple(row['values'].shape)}, "
                    f"not ({input_ids.shape[1]}, {self.k}); delete the cache directory {self.directory} and rerun."
                )
        values = torch.stack([row["values"] for row in rows]).to(input_ids.device).float()
        indices = torch.stack([row["indices"] for row in rows]).to(input_ids.device).long()
        return values, indices
