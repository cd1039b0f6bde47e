"""gRPC channels to nodes, one per endpoint, reused for every call on the same event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    """How to reach nodes: plaintext (development), or mutual TLS in a pool.

    `tls_name(institution, node_id)` is the one name the node announced as must prove: a channel
    to an endpoint is only as good as the identity checked at its other end.
    """

    credentials: grpc.ChannelCredentials | None = None
    tls_name: Callable[[str, str], str] | None = None


class ChannelPool:
    """Channels are bound to the event loop that created them: make one pool per loop."""

    def __init__(self, security: ChannelSecurity | None = None) -> None:
        self._security = security or ChannelSecurity()
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def stub(self, endpoint: str, institution: str, node_id: str) -> coop_pb2_grpc.NodeStub:
        """A stub for the node `node_id` of `institution` at `endpoint` (in a pool, TLS checks it is)."""
        credentials, tls_name = self._security.credentials, self._security.tls_name
        name = "" if credentials is None or tls_name is None else tls_name(institution, node_id)
        channel = self._channels.get((endpoint, name))
        if channel is None:
            options: list[tuple[str, int | str]] = list(GRPC_OPTIONS)
            if credentials is None:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                options.append(("grpc.ssl_target_name_override", name))
                channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
            self._channels[(endpoint, name)] = channel
        return coop_pb2_grpc.NodeStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
