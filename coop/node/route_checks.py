"""Whether a step's route and caller check out, and the hops after this node on that route.

In a pool the route must carry the signature of the coordinator that opened the session, and the
caller must be this node's predecessor on it: that coordinator for the first hop, the previous node
otherwise. (Verified routes are kept per session: the signature is checked once per route, not once
per step.)
"""

from __future__ import annotations

from coop.errors import InvalidInput, SpanOutOfRange, Unauthorized
from coop.node.sessions import LiveSession
from coop.pool.ca import ROLE_NODE, verify_signature
from coop.pool.identity import Identity
from coop.wire.generated import coop_pb2 as pb
from coop.wire.routes import decode_route, route_payload


class RouteChecks:
    def __init__(self, node_id: str, institution: str) -> None:
        self.node_id = node_id
        self.institution = institution

    def hops_after(self, request: pb.StepRequest, caller: Identity | None, live: LiveSession) -> list[pb.Hop]:
        """The hops after this one on the step's route, once the route and the caller check out."""
        session_id = request.session_id
        hops = self._verified_hops(request, live)
        mine = [i for i, hop in enumerate(hops) if (hop.node_id, hop.institution) == (self.node_id, self.institution)]
        if len(mine) != 1:
            raise InvalidInput(f"node {self.node_id} is not on the route of session {session_id}")
        index = mine[0]
        if len(request.sketches) > index:
            raise InvalidInput(
                f"a step for hop {index} carries {len(request.sketches)} sketches, more than hops before it"
            )
        if (hops[index].start, hops[index].end) != live.blocks:
            raise SpanOutOfRange(
                f"the route gives this node blocks {hops[index].start}:{hops[index].end}, "
                f"the session was opened for {live.start}:{live.end}"
            )
        if caller is not None:
            _check_predecessor(live, caller, None if index == 0 else hops[index - 1])
        return hops[index + 1 :]

    def _verified_hops(self, request: pb.StepRequest, live: LiveSession) -> list[pb.Hop]:
        """The route's hops, its signature checked (in a pool) unless it is the session's last verified route."""
        known = live.route
        if known is not None and known[:2] == (request.route, request.route_signature):
            return known[2]
        hops = decode_route(request.route, request.session_id)
        if live.opener is not None:
            try:
                verify_signature(live.opener.certificate, route_payload(request.route), request.route_signature)
            except Unauthorized as exc:
                raise Unauthorized(
                    f"the route of session {request.session_id} is not signed by its coordinator"
                ) from exc
            live.route = (request.route, request.route_signature, hops)
        return hops


def _check_predecessor(live: LiveSession, caller: Identity, previous: pb.Hop | None) -> None:
    if previous is None:
        if live.opener is None or caller.certificate != live.opener.certificate:
            raise Unauthorized(f"only the coordinator of session {live.session_id} may send it its first step")
    elif (caller.role, caller.institution, caller.node_id) != (ROLE_NODE, previous.institution, previous.node_id):
        raise Unauthorized(
            f"{caller.describe()} is not the node before this one on the route of session {live.session_id}"
        )
