"""A session open on a node: what it holds, and the events its coordinator has not read yet."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coop.node.receipt_batches import Blocks, SessionMeter
from coop.pool.identity import Identity
from coop.wire.generated import coop_pb2 as pb

if TYPE_CHECKING:
    from coop.model.engine import SpanEngine

Events = asyncio.Queue[pb.SessionEvent | None]  # None ends the stream


def held_bytes(event: pb.SessionEvent | None) -> int:
    """The hidden-state bytes an unread event holds against its coordinator's budget (failures: none)."""
    return len(event.result.hidden.data) if event is not None and event.HasField("result") else 0


def token_bytes(engine: SpanEngine) -> int:
    """Bytes of one token's hidden state in `engine`'s span: what a session's room is counted in."""
    return engine.hidden_size * engine.dtype.itemsize


def peer_name(caller: Identity | None, host: str) -> str:
    """Whose budget a call counts against: the caller's certificate, or its address (`host`) in development."""
    return caller.describe() if caller is not None else host


@dataclass(eq=False)
class LiveSession:
    session_id: str
    peer: str  # whose session budget it counts against: the coordinator that opened it
    consumer: str  # whose share of the KV cache it counts against: the institution that pays for it
    start: int  # the blocks [start, end) it runs through on this node
    end: int
    priority: float  # in [0, 1]: its steps' place in the batcher's queue
    reserved_bytes: int  # KV cache reserved for max_length tokens
    room_bytes: int  # hidden-state bytes all its steps together may carry: max_length tokens' worth
    meter: SessionMeter
    opener: Identity | None  # None in development mode
    events: Events = field(default_factory=asyncio.Queue)
    last_active: float = field(default_factory=time.monotonic)
    steps_in_flight: int = 0  # accepted, not yet run and pushed
    bytes_to_run: int = 0  # of the steps accepted and not yet run
    bytes_run: int = 0
    closed: bool = False  # its cache is freed and its receipt written; its stream may still be ending
    route: tuple[bytes, bytes, list[pb.Hop]] | None = None  # the last route verified, and its hops
    sketch: tuple[int, int] | None = None  # (seed, dims) of the sketches its steps carry; None: none
    latest_step: tuple[int, int, int] | None = None  # (step_id, start_position, tokens) of the last accepted

    @property
    def blocks(self) -> Blocks:
        return self.start, self.end

    @property
    def room_left_bytes(self) -> int:
        return self.room_bytes - self.bytes_run - self.bytes_to_run

    def idle_since(self, deadline: float) -> bool:
        """No step in flight, and none accepted or finished after `deadline` (time.monotonic)."""
        return self.steps_in_flight == 0 and self.last_active < deadline

    def discard_events(self) -> int:
        """Drop the events not read yet; returns their bytes."""
        discarded = 0
        while not self.events.empty():
            discarded += held_bytes(self.events.get_nowait())
        return discarded
