"""gRPC channels to nodes, one per endpoint, reused for every call on the same event loop."""

from __future__ import annotations

import grpc

from coop.wire.generated import coop_pb2_grpc
from coop.wire.tensors import MAX_TENSOR_BYTES

# A message carries at most one tensor plus a little framing.
MAX_MESSAGE_BYTES = MAX_TENSOR_BYTES + (1 << 20)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
]


class ChannelPool:
    """Channels are bound to the event loop that created them: make one pool per loop."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, endpoint: str) -> coop_pb2_grpc.NodeStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS)
            self._channels[endpoint] = channel
        return coop_pb2_grpc.NodeStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
