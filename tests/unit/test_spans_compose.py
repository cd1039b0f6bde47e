"""Prepare refuses, by behaviour rather than by family name, models whose spans would not compose."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from coop.errors import UnsupportedModel
from coop.model.skeleton import check_spans_compose

_TINY = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}


def _tiny(config: PretrainedConfig) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(vocab_size=64, num_hidden_layers=2, **_TINY),
        GemmaConfig(vocab_size=64, num_hidden_layers=2, head_dim=8, **_TINY),
        Gemma2Config(vocab_size=64, num_hidden_layers=2, head_dim=8, sliding_window=4, **_TINY),
        Gemma3TextConfig(vocab_size=64, num_hidden_layers=2, head_dim=8, sliding_window=4, **_TINY),
    ],
    ids=["llama", "gemma", "gemma2", "gemma3"],
)
def test_models_that_leave_hidden_states_alone_pass(config: PretrainedConfig) -> None:
    check_spans_compose(_tiny(config), 2)


def test_a_forward_that_scales_its_inputs_is_refused() -> None:
    """Older transformers scaled Gemma 1/2's `inputs_embeds` in the base forward; each span would repeat it."""
    model = _tiny(LlamaConfig(vocab_size=64, num_hidden_layers=2, **_TINY))

    def scale(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] * 4.0}

    model.model.register_forward_pre_hook(scale, with_kwargs=True)
    with pytest.raises(UnsupportedModel, match="scales the embeddings"):
        check_spans_compose(model, 2)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)  # blocks put back
