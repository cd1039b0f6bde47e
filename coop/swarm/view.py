"""The coordinator's live view of the swarm: which nodes serve the model, how fast we measured them,
and how busy we keep them.

Nodes come from the DHT directory, re-read every `refresh_s`, and in a pool only those whose
announcement `validator` accepts (signed by a member's node certificate, unrevoked): this list is
the only source of endpoints the coordinator dials (its pings here, its receipt polls and routes
through `live_nodes`), so an endpoint nobody in the pool vouched for is never dialled. The
validator is a required argument: None is development mode, which has no signatures to check.

A node that just failed one of our sessions is held back as a suspect for a while, so new requests
avoid it before its DHT record expires. Only what this coordinator saw makes a suspect (a stream
that broke, a probe unanswered): what one node reports of another is a claim, which the chain
weighs (`coop.pipeline.route_failures`) before it calls `suspect`. A node that refuses sessions is
no suspect, only priced by its refusal rate (`coop.swarm.refusals`). Both, like our measurements
and load, are kept per (institution, node id): a node id is unique only within its institution.

A route counts as our load on its nodes from the moment it is chosen until its chain releases it,
so requests that arrive together spread out instead of all taking the route that was cheapest
before any of them opened.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence

from coop.errors import CoopError, RouteUnavailable
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.directory import SwarmDirectory
from coop.swarm.measurements import Measurements
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.refusals import RefusalRates
from coop.swarm.routing import Hop, choose_route, expected_block_s, missing_blocks

log = logging.getLogger(__name__)

SUSPECT_S = 30.0
RTT_EVERY_REFRESHES = 5  # re-measure round trips every 5th refresh

Ping = Callable[[NodeAnnouncement], Awaitable[float]]


class SwarmView:
    def __init__(
        self,
        directory: SwarmDirectory,
        *,
        pool_id: str,
        model_hash: str,
        num_blocks: int,
        validator: Callable[[NodeAnnouncement], bool] | None,
        refresh_s: float = 1.0,
        revoked: Callable[[], frozenset[str]] = frozenset,
        ping: Ping | None = None,
        quarantined: Callable[[], frozenset[NodeKey]] = frozenset,
    ) -> None:
        """`validator` drops records not signed by the pool (None: development mode); `revoked` names
        revoked institutions; `ping` measures a node's round-trip time in seconds (routes then weigh
        measured RTTs); `quarantined` names the nodes a spot check found cheating
        (coop.coordinator.spot_checks), which no route of ours uses."""
        self.validator = validator
        self.ping = ping
        self.measurements = Measurements()
        self.revoked = revoked
        self.directory = directory
        self.pool_id = pool_id
        self.model_hash = model_hash
        self.num_blocks = num_blocks
        self.refresh_s = refresh_s
        self.nodes: list[NodeAnnouncement] = []
        self.load: Counter[NodeKey] = Counter()  # our sessions per node: routes chosen and not yet released
        self.sessions_open = 0  # those routes: a session counts once, however many hops its route has
        self._suspects: dict[NodeKey, float] = {}  # until when, in time.monotonic()
        self.refusals = RefusalRates()
        self.quarantined = quarantined
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> SwarmView:
        await self.refresh()
        await self.measure_rtts()
        self._task = asyncio.create_task(self._refresh_forever())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def refresh(self) -> None:
        try:
            self.nodes = await asyncio.to_thread(
                self.directory.list_nodes, self.pool_id, self.model_hash, self.validator
            )
        except CoopError as exc:
            log.warning("could not refresh the node list from the DHT: %s", exc)
            return
        listed = {key_of(node) for node in self.nodes}
        self.measurements.keep_only(listed)
        self.refusals.keep_only(listed)

    async def _refresh_forever(self) -> None:
        for count in itertools.count():
            await asyncio.sleep(self.refresh_s)
            await self.refresh()
            if count % RTT_EVERY_REFRESHES == 0:
                await self.measure_rtts()

    async def measure_rtts(self) -> None:
        """Ping every listed node at once; a node that does not answer keeps its last estimate."""
        if self.ping is None:
            return
        nodes = list(self.nodes)
        samples = await asyncio.gather(*(self.ping(node) for node in nodes), return_exceptions=True)
        for node, sample in zip(nodes, samples, strict=True):
            if isinstance(sample, float):
                self.measurements.rtt_measured(key_of(node), sample)

    def step_completed(self, hops: Sequence[Hop], tokens: int, seconds: float) -> None:
        """A chain's step of `tokens` tokens took `seconds` through `hops`, network included.

        Only decode steps (one token) are measured: routes are priced per decode token, and a
        prompt's time per token is another quantity.
        """
        if tokens != 1:
            return
        blocks: Counter[NodeKey] = Counter()
        for hop in hops:
            blocks[hop.key] += hop.end - hop.start
        estimates = expected_block_s(self.nodes, self.measurements.nodes)
        self.measurements.step_measured(seconds, blocks, block_s=estimates, sessions=self.load)

    def suspect(self, key: NodeKey) -> None:
        """This coordinator saw the node fail a session: keep it out of routes for SUSPECT_S."""
        log.warning("suspecting node %s of %s for %.0f s", key[1], key[0], SUSPECT_S)
        self._suspects[key] = time.monotonic() + SUSPECT_S

    def suspects(self) -> set[NodeKey]:
        now = time.monotonic()
        self._suspects = {key: until for key, until in self._suspects.items() if until > now}
        return set(self._suspects)

    def refused(self, key: NodeKey) -> None:
        """The node declined a session of ours (a capacity refusal, or its own report that it failed)."""
        self.refusals.refused(key)

    def served(self, hops: Sequence[Hop]) -> None:
        """Every hop of `hops` opened a session of ours."""
        for hop in hops:
            self.refusals.served(hop.key)

    def leaving(self) -> set[NodeKey]:
        """Nodes announced as draining or paused: their sessions should move to other routes."""
        return {key_of(node) for node in self.nodes if node.state != SERVING}

    def live_nodes(self) -> list[NodeAnnouncement]:
        suspects = self.suspects()
        return [n for n in self.nodes if key_of(n) not in suspects]

    def missing_blocks(self) -> list[tuple[int, int]]:
        """Runs of blocks no serving node covers now: what a request for this model would be refused for."""
        quarantined = self.quarantined()
        serving = [n for n in self.live_nodes() if n.state == SERVING and key_of(n) not in quarantined]
        return missing_blocks([n for n in serving if n.end <= self.num_blocks], self.num_blocks)

    async def route(self, exclude: Collection[NodeKey] = (), avoid_institutions: Collection[str] = ()) -> list[Hop]:
        """The cheapest route now without the nodes `exclude` names or those of `avoid_institutions`,
        counted as our load on its nodes until `release`d."""
        try:
            hops = self._choose(exclude, avoid_institutions)
        except RouteUnavailable:
            await self.refresh()  # a node may have joined since the last refresh
            hops = self._choose(exclude, avoid_institutions)
        self.load.update(hop.key for hop in hops)  # no await since the choice: no one else chose meanwhile
        self.sessions_open += 1
        return hops

    def release(self, hops: Sequence[Hop]) -> None:
        """A chain is done with a route that `route` returned (an empty one: it held none)."""
        if hops:
            self.sessions_open -= 1
        for hop in hops:
            self.load[hop.key] -= 1
            if self.load[hop.key] <= 0:
                del self.load[hop.key]

    def _choose(self, exclude: Collection[NodeKey], avoid_institutions: Collection[str]) -> list[Hop]:
        quarantined = self.quarantined()
        nodes = [
            n for n in self.live_nodes() if key_of(n) not in quarantined and n.institution not in avoid_institutions
        ]
        return choose_route(
            nodes,
            self.num_blocks,
            measured=self.measurements.nodes,
            load=self.load,
            exclude=exclude,
            refusal_rates=self.refusals.rates(),
        )
