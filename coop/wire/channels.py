"""gRPC channels to nodes, one per endpoint, reused for every call on the same event loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import MAX_TENSOR_BYTES

# A message carries at most one tensor plus a little framing.
MAX_MESSAGE_BYTES = MAX_TENSOR_BYTES + (1 << 20)
GRPC_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach nodes: plaintext (development), or mutual TLS with a pool member's certificate."""

    credentials: grpc.ChannelCredentials | None = None
    options: Sequence[tuple[str, int | str]] = field(default_factory=list)


class ChannelPool:
    """Channels are bound to the event loop that created them: make one pool per loop."""

    def __init__(self, security: ChannelSecurity | None = None) -> None:
        self._security = security or ChannelSecurity()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, endpoint: str) -> coop_pb2_grpc.NodeStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            options = [*GRPC_OPTIONS, *self._security.options]
            if self._security.credentials is None:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                channel = grpc.aio.secure_channel(endpoint, self._security.credentials, options=options)
            self._channels[endpoint] = channel
        return coop_pb2_grpc.NodeStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
