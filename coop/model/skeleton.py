"""Build transformers' own model classes without their weights, and find their decoder blocks.

Nothing here knows about a particular architecture: the model is built on the meta device from
its config by transformers itself, the blocks are the model's own `ModuleList` of decoder layers,
and every block a process does not host is replaced by `PassThrough`, so the model's own forward
(rotary embeddings, mask helpers, per-layer attention types) runs unchanged over the hosted span.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from coop.errors import UnsupportedModel

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


class PassThrough(nn.Module):
    """Stands in for a decoder block hosted elsewhere: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def build_empty(config: PretrainedConfig, *, causal_lm: bool) -> PreTrainedModel:
    """The model with parameters on the meta device and real buffers (rotary inv_freq and such)."""
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, attn_implementation="sdpa", dtype=config.dtype)
    return model.eval()


def base_model(model: PreTrainedModel) -> PreTrainedModel:
    base = model.base_model
    return base if isinstance(base, PreTrainedModel) else model


def decoder_layers(model: nn.Module, num_blocks: int) -> nn.ModuleList:
    """The model's list of decoder blocks: the one ModuleList as long as the model is deep."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_blocks]
    if not candidates:
        raise UnsupportedModel(f"{type(model).__name__} has no list of {num_blocks} decoder blocks")
    return candidates[0]


def layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise UnsupportedModel("decoder blocks are not a submodule of the model")


def final_norm_name(base: nn.Module) -> str:
    for name in _FINAL_NORM_NAMES:
        if isinstance(getattr(base, name, None), nn.Module):
            return name
    raise UnsupportedModel(f"{type(base).__name__} has no final norm named one of {_FINAL_NORM_NAMES}")


def check_spans_compose(model: PreTrainedModel, num_blocks: int) -> None:
    """Refuse a model whose base forward changes its input hidden states by itself (Gemma 1 and 2 scale
    `inputs_embeds` there): every span runs that forward, so the change would repeat once per span."""
    base = base_model(model)
    layers = decoder_layers(base, num_blocks)
    blocks, norm_name = list(layers), final_norm_name(base)
    norm = getattr(base, norm_name)
    hidden = torch.randn(1, 3, int(model.config.get_text_config().hidden_size), dtype=model.dtype, device=model.device)
    try:
        for index in range(num_blocks):
            layers[index] = PassThrough()
        setattr(base, norm_name, nn.Identity())
        with torch.inference_mode():
            output = base(inputs_embeds=hidden, use_cache=False).last_hidden_state
    finally:
        for index, block in enumerate(blocks):
            layers[index] = block
        setattr(base, norm_name, norm)
    if not torch.equal(output, hidden):
        raise UnsupportedModel(
            f"{type(base).__name__} changes its input hidden states outside its decoder blocks (e.g. scales the "
            "embeddings in its forward, as Gemma 1 and 2 do): split into spans, its output would differ"
        )
