"""Linear layers whose weights are packed once, at load, into oneDNN's blocked layout (CPU, float32).

Why: torch's default CPU linear (MKL) repacks the weight on every call that has more than one row,
so on this 2-core machine a block's 1536×576 MLP matmul costs 4.4× one row for 8 rows, and the
49152-wide LM head 3× for 8 rows and 7.5 ms even for one. With the weight packed once (what
torch.compile's CPU freezing does, through the same oneDNN ops), 8 rows cost ~1.6× one row and the LM
head ~3 ms for one row: the batched steps of concurrent sessions become nearly free per row.

On other CPUs (a Xeon with AVX-512/AMX) torch's stock Linear is the faster one, so whether a process
packs is chosen by timing both at load (coop.model.weight_layout). The dense weight is dropped (the
memory is the same), except where it is tied to the embeddings, which keep it. Quantized (torchao) weights,
other dtypes and other devices are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN tunes the packed layout for: measured on CPU, 8 serves 1 to 32 rows as well as
# a hint of the exact count does.
BATCH_HINT = 8


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W held in oneDNN's packed layout (an opaque `torch._mkldnn` tensor)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight: torch.Tensor
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.register_buffer("packed_weight", packed)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def packable_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain float32 CPU `nn.Linear` layers of `model`: those `pack_linears` would pack."""
    return [m for m in model.modules() if type(m) is nn.Linear and _plain_cpu_float32(m.weight)]


def pack_linears(model: nn.Module) -> int:
    """Replace every plain float32 CPU `nn.Linear` in `model` by a PackedLinear, in place; how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and _plain_cpu_float32(child.weight)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the packed weights in `model` (buffers, so `parameters()` does not count them)."""
    weights = [m.packed_weight for m in model.modules() if isinstance(m, PackedLinear)]
    return sum(w.numel() * w.element_size() for w in weights)


def _plain_cpu_float32(weight: torch.Tensor) -> bool:
    """A dense float32 CPU tensor, not a quantized tensor subclass."""
    plain = type(weight.detach()) is torch.Tensor
    return plain and can_pack(weight.device, weight.dtype) and weight.layout == torch.strided
