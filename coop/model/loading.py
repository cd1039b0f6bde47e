"""Materialise parts of a prepared model: a span of blocks, the client part, or the whole model.

Each loader builds transformers' own classes on the meta device and fills in only the tensors
it needs, read from the files the manifest lists (hash-checked on the way, except files unchanged
since they last matched: `coop.model.verified`). The Linear weights stay stock: the CPU layout they run
in is chosen by measurement (coop.model.weight_layout) by whoever runs them, the engine, the client part
or, here, the whole-model reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from coop.errors import ModelIntegrityError, SpanOutOfRange
from coop.model.files import load_tensors
from coop.model.manifest import CLIENT_FILE, Manifest
from coop.model.skeleton import (
    PassThrough,
    base_model,
    build_empty,
    decoder_layers,
    final_norm_name,
    layers_prefix,
)
from coop.model.weight_layout import DEFAULT_BATCH_ROWS, apply_weight_layout
from coop.progress import progress_bar


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_config(model_dir: Path, manifest: Manifest) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(str(model_dir))
    config.dtype = getattr(torch, manifest.dtype)
    return config


def check_span(manifest: Manifest, start: int, end: int) -> None:
    if not (0 <= start < end <= manifest.num_blocks):
        raise SpanOutOfRange(
            f"blocks {start}:{end} do not fit {manifest.name}, which has blocks 0:{manifest.num_blocks}"
        )


def _fill(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Swap the meta parameters for the loaded tensors (buffers such as inv_freq stay as built)."""
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelIntegrityError(f"{what} does not match the model's config: {exc}") from exc


def load_span(model_dir: Path, manifest: Manifest, start: int, end: int, device: torch.device) -> PreTrainedModel:
    """The base model with blocks [start, end) materialised and every other block a PassThrough.

    Its forward takes hidden states (`inputs_embeds`) and returns the hidden states after the
    span; embeddings and final norm are replaced by identities because the client part owns them.
    """
    check_span(manifest, start, end)
    config = load_config(model_dir, manifest)
    base = base_model(build_empty(config, causal_lm=False))
    layers = decoder_layers(base, manifest.num_blocks)
    with progress_bar(f"Loading blocks {start}:{end}", end - start) as advance:
        for index in range(manifest.num_blocks):
            if start <= index < end:
                block = layers[index]
                _fill(
                    block,
                    load_tensors(model_dir, manifest, manifest.blocks[index].file, device),
                    f"block {index}",
                )
                advance()
            else:
                layers[index] = PassThrough()
    setattr(base, final_norm_name(base), nn.Identity())
    base.set_input_embeddings(nn.Identity())
    return _on_device(base, device)


def load_client_model(model_dir: Path, manifest: Manifest, device: torch.device) -> PreTrainedModel:
    """The causal-LM with every block a PassThrough: embeddings in, logits out, nothing in between."""
    config = load_config(model_dir, manifest)
    model = build_empty(config, causal_lm=True)
    layers = decoder_layers(model, manifest.num_blocks)
    for index in range(manifest.num_blocks):
        layers[index] = PassThrough()
    _load_non_block_tensors(model, load_tensors(model_dir, manifest, CLIENT_FILE, device))
    return _on_device(model, device)


def load_full_model(
    model_dir: Path,
    manifest: Manifest,
    device: torch.device,
    *,
    layout: str = "auto",
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> PreTrainedModel:
    """The whole model in one process: the reference that every distributed path must match.

    `layout`: its CPU weight layout, "auto" (measured, as nodes and coordinators choose), "stock" or "packed".
    """
    config = load_config(model_dir, manifest)
    model = build_empty(config, causal_lm=True)
    layers = decoder_layers(model, manifest.num_blocks)
    prefix = layers_prefix(model, layers)
    tensors = load_tensors(model_dir, manifest, CLIENT_FILE, device)
    for info in manifest.blocks:
        block = load_tensors(model_dir, manifest, info.file, device)
        tensors.update({f"{prefix}.{info.index}.{name}": t for name, t in block.items()})
    _load_non_block_tensors(model, tensors)
    model = _on_device(model, device)
    apply_weight_layout(model, layout, batch_rows=batch_rows, what="whole model")
    return model


def _load_non_block_tensors(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelIntegrityError(f"unexpected tensors in the model files: {result.unexpected_keys[:5]}")
    model.tie_weights()
    still_empty = [name for name, param in model.named_parameters() if param.is_meta]
    if still_empty:
        raise ModelIntegrityError(f"tensors missing from the model files: {still_empty[:5]}")


def _on_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """Move buffers (rotary tables) to the device the loaded parameters already sit on."""
    return cast(PreTrainedModel, nn.Module.to(model, device).eval())
