"""Replica routes for spot checks: nodes of other institutions over the same blocks, picked at random.

The institution is the unit of trust: a member runs as many node ids as it likes, so a replica or a
referee of the checked node's own institution (or of any institution on the checked route) would
be the checked party vouching for itself. Replicas come only from institutions the caller names as
independent; with none left, there is no check to make.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Sequence

from coop.coordinator.spot_checks.trust_book import TrustBook
from coop.errors import CoopError, PeerError
from coop.pipeline.charge import Charge
from coop.pipeline.remote import RemoteChain, RouteSource
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.routing import Hop
from coop.swarm.view import SwarmView

log = logging.getLogger(__name__)


class _FixedRoute:
    """A `RouteSource` for a replica route chosen in advance."""

    def __init__(self, hops: list[Hop], swarm: SwarmView) -> None:
        self._hops = hops
        self._swarm = swarm
        self.revoked = swarm.revoked

    async def route(self, exclude: Collection[NodeKey] = (), avoid_institutions: Collection[str] = ()) -> list[Hop]:
        if failed := {h.node_id for h in self._hops if h.key in exclude or h.institution in avoid_institutions}:
            raise PeerError(f"the replica {', '.join(sorted(failed))} failed")
        return self._hops

    def release(self, hops: Sequence[Hop]) -> None:
        pass

    def leaving(self) -> set[NodeKey]:
        """A replica route is never moved: a replica that leaves mid-check ends the check instead."""
        return set()

    def suspect(self, key: NodeKey) -> None:
        self._swarm.suspect(key)

    def refused(self, key: NodeKey) -> None:
        self._swarm.refused(key)

    def served(self, hops: Sequence[Hop]) -> None:
        self._swarm.served(hops)

    def step_completed(self, hops: Sequence[Hop], tokens: int, seconds: float) -> None:
        pass


def replica_route(
    nodes: Sequence[NodeAnnouncement],
    start: int,
    end: int,
    avoid: Collection[str],
    rng: random.Random,
    quarantined: Collection[NodeKey] = frozenset(),
) -> list[Hop] | None:
    """Hops over blocks [start, end) on nodes of no institution in `avoid` and not `quarantined`, each
    picked at random among those that serve the next block (so no node can count on checking its
    accomplice); None if they do not tile.

    One institution's nodes are preferred when some institution can tile the range alone (picked at
    random among those that can): a replica of one institution leaves every other institution free to
    referee it, where a replica spread over two would leave a pool of three no independent referee."""
    usable = [n for n in nodes if n.state == SERVING and n.institution not in avoid and key_of(n) not in quarantined]
    institutions = sorted({n.institution for n in usable})
    rng.shuffle(institutions)
    for institution in institutions:
        if hops := _tile([n for n in usable if n.institution == institution], start, end, rng):
            return hops
    return _tile(usable, start, end, rng)


def _tile(nodes: Sequence[NodeAnnouncement], start: int, end: int, rng: random.Random) -> list[Hop] | None:
    hops: list[Hop] = []
    at = start
    while at < end:
        serving = [n for n in nodes if n.start <= at < n.end]
        if not serving:
            return None
        node = rng.choice(serving)
        hops.append(Hop(node.node_id, node.endpoint, at, min(node.end, end), node.institution))
        at = hops[-1].end
    return hops


class SpotChecker:
    """Opens chains whose sampled sessions are checked; one per coordinator."""

    def __init__(
        self, book: TrustBook, swarm: SwarmView, open_replica: Callable[[RouteSource, int, Charge], RemoteChain]
    ) -> None:
        """`open_replica(swarm, max_length, charge)`: an unopened RemoteChain over `swarm`, for shadows."""
        self.book = book
        self.swarm = swarm
        self._open_replica = open_replica

    async def replica(self, hop: Hop, avoid: Collection[str], max_length: int, charge: Charge) -> RemoteChain | None:
        """A session over blocks [hop.start, hop.end) on nodes of no institution in `avoid`, or None if
        there are none or they cannot open one. `charge`: the checked session's, so that replicas are
        paid for the check like for any session."""
        route = replica_route(
            self.swarm.live_nodes(), hop.start, hop.end, avoid, self.book.rng, self.book.quarantined()
        )
        if route is None:
            return None
        chain = self._open_replica(_FixedRoute(route, self.swarm), max_length, charge)
        try:
            return await chain.open()
        except CoopError as exc:
            log.info("replica route %s for blocks %d:%d did not open: %s", route, hop.start, hop.end, exc)
            return None
