"""A model served from the swarm: the coordinator's client part of it, and chains over its nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from coop.config import CoordinatorSettings
from coop.coordinator.spot_checks.checked_chain import CheckedChain
from coop.coordinator.spot_checks.replicas import SpotChecker
from coop.coordinator.spot_checks.trust_book import TrustBook
from coop.coordinator.spot_checks.withholding import WithholdingMeter
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.remote import RemoteChain, RouteSource
from coop.swarm.announcement import NodeAnnouncement
from coop.swarm.view import SwarmView
from coop.wire.channels import ChannelPool
from coop.wire.generated import coop_pb2 as pb

if TYPE_CHECKING:
    from coop.model.client_part import ClientPart
    from coop.pipeline.generation import Chain

PING_TIMEOUT_S = 2.0


async def ping(channels: ChannelPool, node: NodeAnnouncement) -> float:
    """Seconds for one Info round trip to the node: the RTT that routing adds per hop."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stub = channels.stub(node.endpoint, node.institution, node.node_id)
    await stub.Info(pb.InfoRequest(), timeout=PING_TIMEOUT_S)
    return loop.time() - started


class RemoteBackend:
    """A `coop.pipeline.backend.Backend` whose chains run on the swarm's nodes."""

    def __init__(
        self,
        client: ClientPart,
        swarm: SwarmView,
        settings: CoordinatorSettings,
        channels: ChannelPool,
        book: TrustBook,
        sign_route: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """`channels`: to this model's nodes (the process closes them); `book`: the spot checks' verdicts
        on nodes, shared by the models served."""
        self.client = client
        self.channels = channels
        self._sign_route = sign_route
        self.swarm = swarm
        self.settings = settings
        self.model_name = client.manifest.name
        self.max_context = min(settings.max_context, client.manifest.context_length)  # nodes refuse more
        self.spot_checks = SpotChecker(book, swarm, self._replica_chain)

    async def open_chain(self, max_length: int, charge: Charge = UNMETERED) -> Chain:
        policy = self.spot_checks.book.policy
        if not policy.enabled:
            return await self._chain(self.swarm, max_length, charge, self.settings.max_failovers, 0).open()
        withholding = WithholdingMeter(charge.meter)
        withheld = Charge(charge.consumer, withholding)
        chain = self._chain(self.swarm, max_length, withheld, self.settings.max_failovers, policy.sketch_dims)
        return CheckedChain(await chain.open(), self.spot_checks, withholding, charge)

    def _replica_chain(self, swarm: RouteSource, max_length: int, charge: Charge) -> RemoteChain:
        """A spot check's session on replicas: never failed over (a failed replica ends the check)."""
        return self._chain(swarm, max_length, charge, 0, self.spot_checks.book.policy.sketch_dims)

    def _chain(
        self, swarm: RouteSource, max_length: int, charge: Charge, max_failovers: int, sketch_dims: int
    ) -> RemoteChain:
        return RemoteChain(
            swarm,
            self.channels,
            self.client.embed,
            hidden_size=self.client.manifest.hidden_size,
            dtype=self.client.dtype,
            max_length=max_length,
            step_timeout_s=self.settings.step_timeout_s,
            max_failovers=max_failovers,
            charge=charge,
            sign_route=self._sign_route,
            max_queued_events=self.settings.max_queued_events_per_session,
            draft_tokens=self.settings.speculative_tokens,
            sketch_dims=sketch_dims,
        )
