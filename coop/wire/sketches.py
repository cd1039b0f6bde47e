"""Sketches of hidden states: the small, comparable trace of what each node of a route computed.

A sketch is a random projection of a step's hidden states, (1, n, hidden) -> (n, dims) in float32,
by a Gaussian matrix drawn from a seed the coordinator gives each session when it opens it. Being
linear, a projection keeps distances (Johnson-Lindenstrauss): noise of 1% of a hidden state's norm
moves its sketch by about 1% too, with 16-32 dimensions. Every node sketches the input it received
and the output it pushed on every step of every session, so it cannot tell checked sessions from
others, and it costs two (n, hidden) x (hidden, dims) products a step.

The coordinator compares sketches (`relative_distance`) with those of a re-computation on other
replicas (coop/coordinator/spot_checks/).
"""

from __future__ import annotations

import functools

import torch

from coop.errors import InvalidInput
from coop.wire.generated import coop_pb2 as pb
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

MAX_DIMS = 64


@functools.lru_cache(maxsize=64)
def _projection(seed: int, hidden_size: int, dims: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(hidden_size, dims, generator=generator) / dims**0.5
    return matrix.to(device)


def sketch(hidden: torch.Tensor, seed: int, dims: int) -> torch.Tensor:
    """(1, n, hidden) -> (n, dims) float32 on the CPU."""
    projection = _projection(seed, hidden.shape[-1], dims, str(hidden.device))
    return (hidden[0].float() @ projection).cpu()


def sketch_to_proto(node_id: str, received: torch.Tensor, sent: torch.Tensor, seed: int, dims: int) -> pb.Sketch:
    return pb.Sketch(
        node_id=node_id,
        input=tensor_to_proto(sketch(received, seed, dims)),
        output=tensor_to_proto(sketch(sent, seed, dims)),
    )


def sketches_from_proto(
    sketches: list[pb.Sketch], tokens: int, dims: int
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(node_id, input sketch, output sketch) per hop; raises InvalidTensor for a malformed one."""
    shape = (tokens, dims)
    return [
        (
            s.node_id,
            tensor_from_proto(s.input, expected_dtype=torch.float32, expected_shape=shape, name="input sketch"),
            tensor_from_proto(s.output, expected_dtype=torch.float32, expected_shape=shape, name="output sketch"),
        )
        for s in sketches
    ]


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
