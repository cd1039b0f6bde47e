"""Convert torch tensors to and from the wire `Tensor` message.

Everything a peer sends is untrusted: `tensor_from_proto` checks the dtype name, the shape, the byte
length, a size cap (before allocating anything) and finiteness, and raises `InvalidTensor` with a message
that says exactly what is wrong, so a bad peer produces a clear error instead of a crash or garbage
output three nodes later.

Encoding is one copy (tensor memory -> bytes) and decoding is one copy (bytes -> a writable tensor): this
runs once per hop per generated token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from coop.errors import InvalidTensor
from coop.wire.generated import coop_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - no supported platform is big-endian
    raise ImportError("coop's wire format is little-endian; big-endian hosts are not supported")

#: Default cap on one tensor's payload. Note gRPC's own default receive limit is 4 MiB, so channels and
#: servers must raise `grpc.max_receive_message_length` above this for it to matter.
MAX_TENSOR_BYTES = 64 * 1024 * 1024

#: Wire dtype names and the torch dtypes they stand for.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Serialize ``t`` (any device, any strides) as raw little-endian bytes in row-major order."""
    name = _NAMES.get(t.dtype)
    if name is None:
        supported = ", ".join(DTYPES)
        raise InvalidTensor(f"cannot send a tensor of dtype {t.dtype}; supported dtypes are {supported}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # Viewing the bytes as uint8 sidesteps numpy's lack of bfloat16 and costs no copy; tobytes() is the
    # one copy.
    data = flat.view(torch.uint8).numpy().tobytes()
    return pb.Tensor(data=data, dtype=name, shape=list(t.shape))


def tensor_from_proto(
    msg: pb.Tensor,
    *,
    expected_dtype: torch.dtype | None = None,
    expected_shape: tuple[int | None, ...] | None = None,
    max_bytes: int = MAX_TENSOR_BYTES,
    name: str = "tensor",
) -> torch.Tensor:
    """Validate ``msg`` and return it as a new, writable CPU tensor.

    ``expected_shape`` must match in rank; ``None`` in a position accepts any size there. ``name`` is
    what error messages call the tensor (e.g. "hidden states"). Raises `InvalidTensor`.
    """
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        supported = ", ".join(DTYPES)
        raise InvalidTensor(f"{name} has unknown dtype {msg.dtype!r}; expected one of {supported}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise InvalidTensor(f"{name} has dtype {msg.dtype}, expected {_NAMES.get(expected_dtype, expected_dtype)}")

    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidTensor(f"{name} has negative dimension in shape {_fmt_shape(shape)}")
    if expected_shape is not None and (
        len(shape) != len(expected_shape)
        or any(want is not None and got != want for got, want in zip(shape, expected_shape, strict=True))
    ):
        raise InvalidTensor(f"{name} has shape {_fmt_shape(shape)}, expected {_fmt_shape(expected_shape)}")

    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)  # Python ints: a hostile shape cannot overflow this
    claimed = numel * itemsize
    data = msg.data
    if claimed > max_bytes or len(data) > max_bytes:
        size = max(claimed, len(data))
        raise InvalidTensor(f"{name} is {size:,} bytes, more than the limit of {max_bytes:,} bytes")
    if len(data) != claimed:
        raise InvalidTensor(
            f"{name} has {len(data):,} bytes of data but shape {_fmt_shape(shape)} of {msg.dtype} needs {claimed:,}"
        )

    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer rejects empty buffers
    # bytearray() is the one copy; it makes the tensor writable and owns the memory for its lifetime.
    t = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    check_finite(t, name)
    return t


def check_finite(t: torch.Tensor, name: str = "tensor") -> None:
    """InvalidTensor counting the NaN and Inf values if a floating-point tensor holds any."""
    if t.is_floating_point():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nans = int(torch.isnan(t).sum())
            infs = int((~finite).sum()) - nans
            raise InvalidTensor(f"{name} contains non-finite values ({nans} NaN, {infs} Inf)")
