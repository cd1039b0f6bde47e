"""gRPC channels to nodes, one per endpoint, reused for every call on the same event loop.

The pool is bounded: endpoints come from routes and announcements, which other parties choose,
so beyond `max_channels` the least recently used channel with no call in progress is closed
(or, if every channel is busy, the least recently used one, after a grace period for its calls).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
DEFAULT_MAX_CHANNELS = 256
# How long the calls of a busy channel may run on once it is evicted (a step's push takes at most 30 s).
EVICTION_GRACE_S = 30.0


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach nodes: plaintext (development), or mutual TLS in a pool.

    `tls_name(institution, node_id)` is the one name the node announced as must prove: a channel
    to an endpoint is only as good as the identity checked at its other end.
    """

    credentials: grpc.ChannelCredentials | None = None
    tls_name: Callable[[str, str], str] | None = None

    def target_name(self, institution: str, node_id: str) -> str:
        """The name the node must prove in TLS ("" in development mode)."""
        if self.credentials is None or self.tls_name is None:
            return ""
        return self.tls_name(institution, node_id)

    def options(self, target_name: str) -> list[tuple[str, int | str]]:
        """Channel options for a node that must prove `target_name`."""
        return [*GRPC_OPTIONS, *([("grpc.ssl_target_name_override", target_name)] if target_name else [])]


class _Channel:
    """A pooled channel and how many calls on it have not ended."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.active_calls = 0

    def call_ended(self, _call: object) -> None:
        self.active_calls -= 1

    def unary_unary(self, *args: Any, **kwargs: Any) -> _Counted:
        return _Counted(self.channel.unary_unary(*args, **kwargs), self)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _Counted:
        return _Counted(self.channel.stream_stream(*args, **kwargs), self)


class _Counted:
    """A method of a stub whose calls count as active on their channel until they end."""

    def __init__(self, method: Any, owner: _Channel) -> None:
        self._method = method
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._method(*args, **kwargs)
        self._owner.active_calls += 1
        call.add_done_callback(self._owner.call_ended)
        return call


class ChannelPool:
    """Channels are bound to the event loop that created them: make one pool per loop."""

    def __init__(self, security: ChannelSecurity | None = None, *, max_channels: int = DEFAULT_MAX_CHANNELS) -> None:
        self._security = security or ChannelSecurity()
        self.max_channels = max_channels
        self._channels: OrderedDict[tuple[str, str], _Channel] = OrderedDict()  # least recently used first
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # evicted, waiting for their calls
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._channels)

    def stub(self, endpoint: str, institution: str, node_id: str) -> coop_pb2_grpc.NodeStub:
        """A stub for the node `node_id` of `institution` at `endpoint` (in a pool, TLS checks it is)."""
        credentials = self._security.credentials
        name = self._security.target_name(institution, node_id)
        key = (endpoint, name)
        pooled = self._channels.get(key)
        if pooled is None:
            options = self._security.options(name)
            if credentials is None:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            else:
                channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
            pooled = self._channels[key] = _Channel(channel)
            self._evict()
        else:
            self._channels.move_to_end(key)
        return coop_pb2_grpc.NodeStub(pooled)

    def _evict(self) -> None:
        """Close channels beyond max_channels, never the newest (the caller is about to use it)."""
        while len(self._channels) > self.max_channels:
            older = list(self._channels.items())[:-1]
            key = next((key for key, pooled in older if pooled.active_calls == 0), older[0][0])
            channel = self._channels.pop(key).channel
            self.evicted += 1
            task = asyncio.get_running_loop().create_task(channel.close(grace=EVICTION_GRACE_S))
            self._closing[task] = channel
            task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def close(self) -> None:
        channels, self._channels = self._channels, OrderedDict()
        closing, self._closing = self._closing, {}
        for task in closing:
            task.cancel()
        for channel in [*(pooled.channel for pooled in channels.values()), *closing.values()]:
            await channel.close()
