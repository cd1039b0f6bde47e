"""Weight-only quantization of decoder blocks, done once by `coop model prepare --quantize`.

The library is torchao (pinned in pyproject.toml), chosen because its formats run on CPU and CUDA
alike and round-trip through safetensors without pickle:

- int8: `Int8WeightOnlyConfig`, int8 weights with one scale per output row.
- int4: `IntxWeightOnlyConfig(int4, groups of 32)`, int4 values with one scale per 32 weights,
  stored one value per byte (`IntxUnpackedToInt8Tensor`). It is torchao 0.18's only int4 layout
  that runs on CPU: `Int4WeightOnlyConfig` needs the CUDA-only `mslk` kernels (plain) or tinygemm
  (tile_packed_to_4d), and its CPU layout ("opaque") was removed in 0.18. So an int4 block is no
  smaller than an int8 one (~15% larger, for its group scales and zero points) and less exact; a
  packed int4 store would be device-specific, and CPU nodes could not load it.

Only the blocks' Linear weights are quantized: norms stay in the model dtype, and the client part
(embeddings, final norm, LM head) is never quantized. Parameter counts, hence FLOPs and credits,
are those of the unquantized model: a quantized block delivers the same matmuls per token.

A block file holds each quantized tensor's plain parts (qdata, scale, ...) and torchao's metadata
naming its class, which torchao rebuilds only from an allow-list of its own tensor classes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from coop.errors import ModelIntegrityError, ModelStoreError

Quantization = Literal["none", "int8", "int4"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# Stored bytes per quantized weight: int8 has one scale per output row (negligible); int4 values sit one per
# byte (see above) with a float32 scale and an int8 zero point per group of 32.
_WEIGHT_BYTES = {"int8": 1.0, "int4": 1.0 + (4 + 1) / INT4_GROUP_SIZE}
# torchao's safetensors metadata key listing the tensors it flattened.
_TORCHAO_TENSOR_NAMES = "tensor_names"


def check_quantization(name: str) -> Quantization:
    for known in QUANTIZATIONS:
        if name == known:
            return known
    raise ModelStoreError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")


def stored_bytes_per_weight(quantization: str, dtype: str) -> float:
    """Bytes one block weight takes in memory, quantized or in `dtype` (a torch dtype's name)."""
    return _WEIGHT_BYTES.get(quantization) or float(getattr(torch, dtype).itemsize)


def keep_torchao_unloaded() -> None:
    """Make torchao unimportable in a process that serves no quantized model; call it before importing transformers.

    transformers imports torchao whenever it is installed (`modeling_utils` imports every quantizer, and
    its torchao quantizer imports torchao if `importlib.util.find_spec` finds it): ~0.15 s of CPU in a
    node's start, and warnings about CUDA-only kernels. None in `sys.modules` is Python's own way to block
    an import: `import torchao` raises ModuleNotFoundError and `find_spec` returns None, so transformers
    sees no torchao. Does nothing where torchao is already imported.
    """
    sys.modules.setdefault("torchao", None)  # type: ignore[arg-type]  # None is the documented "blocked" entry


def _torchao() -> ModuleType:
    try:
        import torchao.quantization
    except ImportError as exc:
        raise ModelStoreError(
            "quantized models need torchao; install it with `pip install --no-deps torchao==0.18.0`"
        ) from exc
    return torchao.quantization


def _config(quantization: Quantization) -> Any:
    ao = _torchao()
    if quantization == "int8":
        return ao.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    int4 = torch.int4  # type: ignore[attr-defined]  # a real dtype since torch 2.6, missing from its stubs
    return ao.IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(INT4_GROUP_SIZE))


def quantize_block(block: nn.Module, quantization: Quantization, what: str) -> dict[str, torch.Tensor]:
    """Replace the Linear weights of `block` by quantized tensors, in place; its state to save."""
    if quantization == "int4":
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and module.in_features % INT4_GROUP_SIZE:
                raise ModelStoreError(
                    f"{what}: {name} has {module.in_features} inputs, not a multiple of the int4 group size "
                    f"{INT4_GROUP_SIZE}; prepare this model with --quantize int8"
                )
    _torchao().quantize_(block, _config(quantization))
    return {name: tensor.detach() for name, tensor in block.state_dict().items()}


def save_block(state: dict[str, torch.Tensor], path: Path, quantization: Quantization) -> None:
    if quantization == "none":
        save_file(state, str(path))
        return
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, str(path), metadata=metadata)


def restore_quantized(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The quantized tensors of a block file read as plain `tensors`, rebuilt from the file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _TORCHAO_TENSOR_NAMES not in metadata:
        raise ModelIntegrityError(f"{path} holds no quantized tensors, but the manifest says the model is quantized")
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    try:
        restored, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelIntegrityError(f"{path} has unreadable quantized tensors: {exc}") from exc
    return {**restored, **leftover}
