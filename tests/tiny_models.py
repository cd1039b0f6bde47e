"""Tiny random-weight models of several families, built from configs: no download, no files shipped."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON),
    "mistral": MistralConfig(**_COMMON, sliding_window=8),
    # sliding window on some layers only: masks must be sized per layer type, per span
    "qwen2": Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    "qwen3": Qwen3Config(**_COMMON, head_dim=16),
    "mixtral": MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": Qwen3MoeConfig(
        **_COMMON,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[1],
    ),
}


def save_tiny_model(family: str, directory: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family], dtype=torch.float32)
    model.save_pretrained(directory)
    return directory
