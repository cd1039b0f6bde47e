"""`coop coordinator start`: per model served, its client part and a live view of its nodes; one HTTP API.

Each model is a `RemoteBackend` of its own (its nodes are found under its own directory key); the
models share the ledger, fair share, receipt collection and the spot checks' verdicts, since those
are about members and nodes, not models.

Start-up forks the DHT process first and loads the client parts (which import transformers) while
the DHT joins the swarm; the ledger (SQLModel) and the web app are imported only when needed, so
`coop coordinator start` imports nothing heavy before that fork.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from coop.config import CoordinatorSettings
from coop.coordinator.catalog import ModelCatalog, ServedModel
from coop.coordinator.http.auth import ApiKeyGate
from coop.coordinator.http.limits import HttpLimits
from coop.coordinator.spot_checks.checked_chain import CheckedChain
from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.coordinator.spot_checks.replicas import SpotChecker
from coop.coordinator.spot_checks.trust_book import TrustBook, ledger_audit
from coop.model.manifest import Manifest
from coop.pipeline.charge import UNMETERED, Charge
from coop.pipeline.remote import RemoteChain, RouteSource
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.membership import Membership
from coop.pool.registry import REVOCATIONS_FILE
from coop.swarm.announcement import NodeAnnouncement, announcement_validator
from coop.swarm.directory import SwarmDirectory
from coop.swarm.revocations import RevocationWatcher
from coop.swarm.trust import trust_from_ledger
from coop.swarm.validation import pool_record_validator
from coop.swarm.view import SwarmView
from coop.wire.channels import ChannelPool, ChannelSecurity
from coop.wire.generated import coop_pb2 as pb

if TYPE_CHECKING:
    from coop.coordinator.accounts.bookkeeping import Bookkeeping
    from coop.model.client_part import ClientPart
    from coop.pipeline.generation import Chain

log = logging.getLogger(__name__)

READY_MARKER = "COOP_COORDINATOR_READY"
PING_TIMEOUT_S = 2.0


class RemoteBackend:
    """A `coop.pipeline.backend.Backend` whose chains run on the swarm's nodes."""

    def __init__(
        self,
        client: ClientPart,
        swarm: SwarmView,
        settings: CoordinatorSettings,
        security: ChannelSecurity,
        sign_route: Callable[[bytes], bytes] | None = None,
        book: TrustBook | None = None,
    ) -> None:
        """`book`: the spot checks' verdicts on nodes, shared by the models served (default: one of its own)."""
        self.client = client
        self._security = security
        self._sign_route = sign_route
        self.swarm = swarm
        self.settings = settings
        self.model_name = client.manifest.name
        self.max_context = min(settings.max_context, client.manifest.context_length)  # nodes refuse more
        self._channels: ChannelPool | None = None
        book = book or TrustBook(SpotCheckPolicy.from_settings(settings))
        self.spot_checks = SpotChecker(book, swarm, self._replica_chain)
        swarm.quarantined = self.spot_checks.book.quarantined

    @property
    def channels(self) -> ChannelPool:
        if self._channels is None:
            self._channels = ChannelPool(self._security)  # created on the serving event loop
        return self._channels

    async def ping(self, node: NodeAnnouncement) -> float:
        """Seconds for one Info round trip to the node: the RTT that routing adds per hop."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        stub = self.channels.stub(node.endpoint, node.institution, node.node_id)
        await stub.Info(pb.InfoRequest(), timeout=PING_TIMEOUT_S)
        return loop.time() - started

    async def open_chain(self, max_length: int, charge: Charge = UNMETERED) -> Chain:
        if charge.meter is not None:
            charge = self._priced(charge)
        policy = self.spot_checks.book.policy
        if not policy.enabled:
            return await self._chain(self.swarm, max_length, charge, self.settings.max_failovers, 0).open()
        charge, withholding = self.spot_checks.charge(charge)
        chain = self._chain(self.swarm, max_length, charge, self.settings.max_failovers, policy.sketch_dims)
        return CheckedChain(await chain.open(), self.spot_checks, withholding)

    def _priced(self, charge: Charge) -> Charge:
        """The charge with its meter naming this model in observations and counting its FLOPs in fair share."""
        from coop.coordinator.accounts.observations import (  # the ledger's: imported once accounts are kept
            KeyedMeter,
            ModelRate,
        )

        if not isinstance(charge.meter, KeyedMeter):
            return charge
        manifest = self.client.manifest
        return replace(
            charge, meter=charge.meter.for_model(ModelRate(manifest.content_hash, manifest.span_flops_per_token))
        )

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

    async def close(self) -> None:
        if self._channels is not None:
            await self._channels.close()


async def run_coordinator(settings: CoordinatorSettings) -> None:
    membership = Membership.load(settings.member_bundle, pool_id=settings.pool_id).require(ROLE_COORDINATOR)
    manifests = [Manifest.load(model_dir) for model_dir in settings.model_dirs]
    validator = pool_record_validator(membership)
    directory = SwarmDirectory.launch(list(settings.initial_peers), settings.host, 0, validator=validator)
    joined = asyncio.create_task(asyncio.to_thread(directory.wait_ready))
    try:
        loading = asyncio.to_thread(_load_clients, settings.model_dirs, settings.device)
        clients, _ = await asyncio.gather(loading, joined)
    except BaseException:
        await asyncio.gather(joined, return_exceptions=True)
        await asyncio.to_thread(directory.shutdown)
        raise
    from coop.admin import AdminContext, mount_admin
    from coop.admin.auth import SignInThrottle
    from coop.coordinator.http.app import create_app

    sign_route = membership.credentials.sign if membership.credentials is not None else None
    book = TrustBook(SpotCheckPolicy.from_settings(settings))
    backends: list[RemoteBackend] = []
    for client, manifest in zip(clients, manifests, strict=True):
        swarm = SwarmView(
            directory,
            pool_id=membership.pool_id,
            model_hash=manifest.content_hash,
            num_blocks=manifest.num_blocks,
            refresh_s=settings.refresh_s,
            validator=announcement_validator(membership),
            revoked=membership.revocations,
        )
        backend = RemoteBackend(client, swarm, settings, membership.channel_security(), sign_route, book)
        swarm.ping = backend.ping
        backends.append(backend)
    default = backends[0]

    def live_nodes() -> list[NodeAnnouncement]:
        return [node for backend in backends for node in backend.swarm.live_nodes()]

    pool_list = [] if settings.pool_dir is None else [settings.pool_dir / REVOCATIONS_FILE]
    watcher = RevocationWatcher(membership.revocations, directory, files=pool_list)
    bookkeeping: Bookkeeping | None = None
    trust: asyncio.Task[None] | None = None  # spot checks' verdicts to and from the ledger
    try:
        catalog = ModelCatalog([ServedModel(b, b.swarm.missing_blocks, b.swarm.refresh) for b in backends])
        await asyncio.to_thread(watcher.start)
        for backend in backends:
            await backend.swarm.start()
        if membership.bundle is not None:
            from coop.coordinator.accounts.bookkeeping import Bookkeeping

            bookkeeping = await Bookkeeping.start(
                settings, membership.bundle, membership.revocations, manifests, lambda: default.channels, live_nodes
            )
            actor = f"coordinator:{membership.bundle.institution}"
            ledger = bookkeeping.ledger
            trust = asyncio.create_task(book.follow(ledger_audit(ledger, actor), partial(trust_from_ledger, ledger)))
        gate = ApiKeyGate(settings.api_keys_file, membership.bundle.limits if membership.bundle else None)
        access = bookkeeping.access if bookkeeping else None
        from coop.coordinator.http.metrics import CoordinatorMetrics  # pulls in the text pipeline: after the join

        metrics = CoordinatorMetrics()
        if bookkeeping is not None:
            metrics.watch_bookkeeping(bookkeeping)
        app = create_app(
            catalog,
            keys=gate,
            access=access,
            session_idle_timeout_s=settings.session_idle_timeout_s,
            limits=HttpLimits.from_settings(settings),
            public_docs=membership.bundle is None if settings.public_api_docs is None else settings.public_api_docs,
            metrics=metrics,
            metrics_token=settings.metrics_token,
        )
        if settings.pool_dir is not None and bookkeeping is not None:
            metering = bookkeeping.metering
            admin = AdminContext.for_coordinator(
                settings.pool_dir,
                bookkeeping.ledger,
                bookkeeping.fair_share,
                lambda: metering.tokens_served,
                {backend.model_name: backend.swarm for backend in backends},
                rejections=app.state.rejections.snapshot,
                sign_in=SignInThrottle(settings.admin_sign_in_burst, settings.admin_sign_in_refill_s),
                receipt_collection=bookkeeping.collector.stats,
            )
            mount_admin(app, admin)
        # log_config=None: uvicorn's records go through the process's handler (--log-format)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", log_config=None)
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            ready = {
                "url": f"http://{settings.host}:{port}",
                "dht_maddrs": directory.visible_maddrs(),
                "pool_id": membership.pool_id,
                "tls": membership.secure,
                "models": [backend.model_name for backend in backends],
            }
            print(f"{READY_MARKER} {json.dumps(ready)}", flush=True)
        await serving
    finally:
        if trust is not None:
            trust.cancel()
        watcher.stop()
        for backend in backends:
            await backend.close()
        if bookkeeping is not None:
            await bookkeeping.close()
        for backend in backends:
            await backend.swarm.stop()
        await asyncio.to_thread(directory.shutdown)


def _load_clients(model_dirs: Sequence[Path], device: str) -> list[ClientPart]:
    """One after the other: transformers' meta-device skeletons are not built safely in parallel threads."""
    from coop.model.client_part import ClientPart

    return [ClientPart.load(model_dir, device=device) for model_dir in model_dirs]
