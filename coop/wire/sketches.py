"""Sketches of hidden states: the small, comparable trace of what each node of a route computed.

A sketch is a random projection of a step's hidden states, (1, n, hidden) -> (n, dims) in float32.
Being linear, a projection keeps distances (Johnson-Lindenstrauss): noise of 1% of a hidden state's
norm moves its sketch by about 1% too, with 16-32 dimensions. Every node sketches the tensor it
received and the one it pushed on, decoded from their wire bytes, on every step of every session, so
it cannot tell checked sessions from others.

Each projection is bound to the bytes it sketches: it is drawn from the seed the coordinator gives
the session when it opens it and from the `digest` of the tensor's wire bytes (dtype, shape, data),
and each sketch carries that digest. With one projection per session, a node knowing the seed could
push O + v with v in the projection's null space: neither its output sketch nor the next hop's
input sketch would show v, and the next hop's output would be blamed for it. Now v changes the
bytes, hence the projection, so finding a v its own projection does not see is a hash search, not
a linear solve. The coordinator checks that each hop's output digest is the next hop's input digest
and projects its re-computation of a hop with that hop's own projection
(coop/coordinator/spot_checks/).

Drawing a fresh (hidden, dims) Gaussian per tensor costs ~0.2 ms, two per step on every node;
instead a Gaussian base matrix is drawn once per session seed (cached), and each entry's sign is
flipped by one bit of a shake_128 stream of (seed, digest). The result is a Gaussian matrix too,
so honest distances are kept as before; and against a change v fixed before the bytes (so before
the signs), each of the sketch's dims coordinates of v is an independent sum of v's entries times
known magnitudes with fresh random signs: near zero for all of them at once about as rarely as
under a fresh Gaussian (even v built to cancel for one sign pattern, which exists, needs all of its
entries' bits to come out that way). Being a hash, the stream gives nodes and coordinators the same
projection on any platform.

The coordinator compares sketches (`relative_distance`) with those of a re-computation on other
replicas.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from coop.errors import InvalidInput, InvalidTensor
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import DTYPES, tensor_from_proto, tensor_to_proto

MAX_DIMS = 64
DIGEST_BYTES = 16


@dataclass(frozen=True)
class HopSketch:
    """One hop's sketches of a step, as it returned them."""

    node_id: str
    input: torch.Tensor  # (n, dims) float32: of the tensor it received
    output: torch.Tensor  # (n, dims) float32: of the tensor it pushed on
    input_digest: bytes
    output_digest: bytes


def digest(tensor: pb.Tensor) -> bytes:
    """A wire tensor's dtype, shape and data, hashed: what a sketch's projection is drawn from."""
    hasher = hashlib.blake2b(f"{tensor.dtype}{list(tensor.shape)}".encode(), digest_size=DIGEST_BYTES)
    hasher.update(tensor.data)
    return hasher.digest()


@functools.lru_cache(maxsize=64)
def _base(seed: int, hidden_size: int, dims: int) -> np.ndarray:
    """The session's Gaussian (hidden_size, dims) float32 matrix, as the uint32 words of its floats."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(hidden_size, dims, generator=generator) / dims**0.5
    return matrix.numpy().view(np.uint32)


def projection(seed: int, tensor_digest: bytes, hidden_size: int, dims: int) -> torch.Tensor:
    """(hidden_size, dims) float32 on the CPU: the session's base matrix, each entry's sign flipped by
    one bit of a shake_128 stream of (seed, tensor_digest)."""
    entries = hidden_size * dims
    stream = hashlib.shake_128(seed.to_bytes(8, "little") + tensor_digest).digest((entries + 7) // 8)
    flips = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), count=entries).reshape(hidden_size, dims)
    words = _base(seed, hidden_size, dims) ^ (flips.astype(np.uint32) << 31)  # bit 31: a float32's sign
    return torch.from_numpy(words.view(np.float32))


def sketch(hidden: torch.Tensor, seed: int, dims: int, tensor_digest: bytes) -> torch.Tensor:
    """(1, n, hidden) -> (n, dims) float32 on the CPU, by the projection of the bytes `tensor_digest` names."""
    matrix = projection(seed, tensor_digest, hidden.shape[-1], dims).to(hidden.device)
    return (hidden[0].float() @ matrix).cpu()


def _wire_sketch(tensor: pb.Tensor, seed: int, dims: int) -> tuple[bytes, pb.Tensor]:
    """(digest, sketch) of a tensor a node received, so already checked, or made: decoded without
    `tensor_from_proto`'s checks, which would cost more than the sketch."""
    values = torch.frombuffer(bytearray(tensor.data), dtype=DTYPES[tensor.dtype]).reshape(tuple(tensor.shape))
    tensor_digest = digest(tensor)
    return tensor_digest, tensor_to_proto(sketch(values, seed, dims, tensor_digest))


def sketch_to_proto(node_id: str, received: pb.Tensor, sent: pb.Tensor, seed: int, dims: int) -> pb.Sketch:
    """A node's sketches of a step: of the tensor it `received` and the one it `sent`, as on the wire."""
    input_digest, input_sketch = _wire_sketch(received, seed, dims)
    output_digest, output_sketch = _wire_sketch(sent, seed, dims)
    return pb.Sketch(
        node_id=node_id,
        input=input_sketch,
        output=output_sketch,
        input_digest=input_digest,
        output_digest=output_digest,
    )


def sketches_from_proto(sketches: list[pb.Sketch], tokens: int, dims: int) -> list[HopSketch]:
    """Each hop's sketches; raises InvalidTensor for a malformed one."""
    shape = (tokens, dims)
    hops = []
    for s in sketches:
        if len(s.input_digest) != DIGEST_BYTES or len(s.output_digest) != DIGEST_BYTES:
            raise InvalidTensor(f"the sketch of {s.node_id} lacks {DIGEST_BYTES}-byte digests")
        hops.append(
            HopSketch(
                s.node_id,
                tensor_from_proto(s.input, expected_dtype=torch.float32, expected_shape=shape, name="input sketch"),
                tensor_from_proto(s.output, expected_dtype=torch.float32, expected_shape=shape, name="output sketch"),
                s.input_digest,
                s.output_digest,
            )
        )
    return hops


def relative_distance(claimed: torch.Tensor, computed: torch.Tensor, scale: torch.Tensor) -> float:
    """The worst token's distance between two (n, dims) sketches, relative to that token's `scale`
    (the norm of what the hop added to the residual stream: its output sketch minus its input's)."""
    distances = (claimed - computed).norm(dim=-1)
    return float((distances / scale.norm(dim=-1).clamp_min(1e-12)).max())


def check_dims(dims: int) -> int:
    """A session's sketch_dims, if it is one a node accepts."""
    if not 0 < dims <= MAX_DIMS:
        raise InvalidInput(f"sketch_dims must be in 1..{MAX_DIMS}, got {dims}")
    return dims
