"""Tiny random models built from configs, one per family hf_vram must handle."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

_COMMON = dict(vocab_size=320, max_position_embeddings=128)
_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, **_DECODER, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, **_DECODER, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**_COMMON, **_DECODER),
    "qwen3": lambda: Qwen3Config(**_COMMON, **_DECODER, head_dim=16),
    "gemma": lambda: GemmaConfig(**_COMMON, **_DECODER, head_dim=16),
    "phi3": lambda: Phi3Config(**_COMMON, **_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: GPT2Config(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(
        vocab_size=320,
        max_position_embeddings=128,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
    ),
    "bert": lambda: BertConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
    ),
}
TINY_ARCHS = tuple(CONFIGS)
AUTO_CLASS = {arch: AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM for arch in TINY_ARCHS}


def build_tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AUTO_CLASS[arch].from_config(CONFIGS[arch]())
    return model.eval()


def sample_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=g)
