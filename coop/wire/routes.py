"""A session's route as its coordinator signs it: which node runs which blocks, in which order.

Every step carries the serialized `Route` and, in a pool, the coordinator's signature over it. A
node runs a step only if it is on the route and the step came from its predecessor there (the
coordinator for the first hop), and pushes the output only to its successor: no member can inject
steps into another's session or make a node dial an address of its choosing.

A step that rewinds the caches (dropping rejected draft tokens) carries a second signature of the
coordinator, over a `Rewind` naming that step: a hop cannot make its successor compute again what
the coordinator never asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from google.protobuf.message import DecodeError

from coop.errors import InvalidInput
from coop.wire.generated import coop_pb2 as pb

ROUTE_DOMAIN = b"coop-route-v1\n"  # domain separation: never valid as another kind of signature
REWIND_DOMAIN = b"coop-rewind-v1\n"
MAX_HOPS = 256
MAX_ROUTE_BYTES = 65536
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:\d{1,5}$")


class HopLike(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def institution(self) -> str: ...


def encode_route(session_id: str, hops: Sequence[HopLike]) -> bytes:
    route = pb.Route(
        session_id=session_id,
        hops=[
            pb.Hop(endpoint=h.endpoint, start=h.start, end=h.end, node_id=h.node_id, institution=h.institution)
            for h in hops
        ],
    )
    return route.SerializeToString(deterministic=True)


def decode_route(data: bytes, session_id: str) -> list[pb.Hop]:
    """The hops of a step's route; InvalidInput unless it is well-formed and for this session."""
    if len(data) > MAX_ROUTE_BYTES:
        raise InvalidInput(f"a route is at most {MAX_ROUTE_BYTES} bytes")
    try:
        route = pb.Route.FromString(data)
    except DecodeError as exc:
        raise InvalidInput("the step's route is not a serialized Route") from exc
    if route.session_id != session_id:
        raise InvalidInput("the step's route is for another session")
    hops = list(route.hops)
    if not 1 <= len(hops) <= MAX_HOPS or any(not _ENDPOINT.match(hop.endpoint) for hop in hops):
        raise InvalidInput(f"a route has 1 to {MAX_HOPS} hops, each with a host:port endpoint")
    return hops


def route_payload(data: bytes) -> bytes:
    """What the coordinator signs: exactly these route bytes."""
    return ROUTE_DOMAIN + data


def rewind_payload(session_id: str, step_id: int, start_position: int, tokens: int) -> bytes:
    """What the coordinator signs to let step `step_id` rewind the caches to `start_position`."""
    rewind = pb.Rewind(session_id=session_id, step_id=step_id, start_position=start_position, tokens=tokens)
    return REWIND_DOMAIN + rewind.SerializeToString(deterministic=True)
