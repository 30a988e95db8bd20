"""int8 embeddings, and an output head that reads a tied embedding's int8 storage.

SmolLM2-sized models spend a fifth of their weights on the token embedding, which every peer leaves in 16/32-bit.
``Int8Embedding`` stores it per row (one float32 scale per token). When the output head is tied to it,
``TiedInt8Head`` computes logits straight from the same int8 rows, so the tie stays one storage: each row's
scale is exactly a per-output-channel scale of the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_vram.kernels import ops
from hf_vram.quant import schemes
from hf_vram.quant.linear import resolve_compute_dtype
from hf_vram.quant.placeholder import LoadPlaceholderMixin
from hf_vram.quant.state import Int8RowsMixin, QuantStateMixin


class Int8Embedding(Int8RowsMixin, QuantStateMixin, LoadPlaceholderMixin, nn.Module):
    """``nn.Embedding`` with int8 rows and a float32 scale per row.

    Its output dtype (``out_dtype``) is the model's float dtype: set when the model is built or loaded, and moved
    by ``model.to(dtype)``, so the norms after it (LayerNorm in GPT-2/OPT) get the dtype of their own weights.
    ``embed_scale``: the constant some models' embeddings multiply their rows by (Gemma's scaled word embedding,
    ``sqrt(hidden_size)``); a tied head reads the rows unscaled, as the original does.
    """

    scheme = "int8"
    quantized_buffers = ("qweight", "scales")

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        out_dtype: torch.dtype = torch.float32,
        embed_scale: float | None = None,
        device=None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        self.embed_scale = embed_scale
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device=device))
        self._init_kernel_copy()  # the rows are also a tied head's packed-kernel weight

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            out_dtype=embedding.weight.dtype,
            embed_scale=embedding_scale(embedding),
            device=embedding.weight.device,
        )
        layer.load_quantized(layer.quantize_weight(embedding.weight))
        return layer

    def _float_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def add_load_placeholder(self, dtype: torch.dtype) -> None:
        self.out_dtype = dtype
        super().add_load_placeholder(dtype)

    def quantize_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, s = schemes.quantize_int8(weight)
        return {"qweight": q, "scales": s}

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            setattr(self, name, value)

    def _follow_float_dtype(self, fn) -> None:
        self.out_dtype = self._converted_dtype(fn, self.out_dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return schemes.dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.qweight)
        out = (rows.to(torch.float32) * F.embedding(input_ids, self.scales[:, None])).to(self.out_dtype)
        return out * self.embed_scale if self.embed_scale is not None else out

    def to_float_embedding(self, dtype: torch.dtype = torch.float32) -> nn.Embedding:
        if self.embed_scale is not None:
            raise NotImplementedError(
                "hf_vram: dequantizing a scaled int8 embedding (Gemma) back into a float one is not supported; load the "
                "float checkpoint instead."
            )
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, dtype=dtype, device=self.qweight.device)
        emb.weight.data.copy_(self.dequantize_weight(dtype))
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme=int8"


def embedding_scale(embedding: nn.Module) -> float | None:
    """The constant a scaled embedding multiplies its rows by (Transformers keeps it as ``scalar_embed_scale``);
    None for a plain lookup. Raises for an embedding subclass that computes something this module does not."""
    if type(embedding) is nn.Embedding:
        return None
    scale = getattr(embedding, "scalar_embed_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    raise NotImplementedError(
        f"hf_vram: the embedding {type(embedding).__name__} computes more than a row lookup, which the int8 embedding "
        "does not reproduce; set quantization.quantize_embeddings: false."
    )


class TiedInt8Head(nn.Module):
    """Output projection tied to an ``Int8Embedding``: reads the embedding's int8 rows, owns no weight.

    A head bias (BERT's decoder) is kept as the same ``nn.Parameter`` the model ties it to (``cls.predictions.bias``),
    so Transformers' own bias tie keeps working when a checkpoint loads into the head.
    """

    def __init__(self, embedding: Int8Embedding, bias: nn.Parameter | None = None, compute_dtype: str = "auto") -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: the tensors are saved once, under it
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.compute_dtype = compute_dtype
        self._compute_dtype = resolve_compute_dtype(compute_dtype)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.embedding.prepare_for_device()
        shape = x.shape
        emb = self.embedding
        y = ops.int8_linear(
            x.reshape(-1, shape[-1]), emb.qweight, emb.scales, emb._kernel_copy.tensor, self.bias, self._compute_dtype
        )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to int8 embedding"
