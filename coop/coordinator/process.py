"""`coop coordinator start`: per model served, its client part and a live view of its nodes; one HTTP API.

Each model is a `RemoteBackend` of its own (its nodes are found under its own directory key); the
models share the ledger, fair share, receipt collection and the spot checks' verdicts, since those
are about members and nodes, not models.

Start-up forks the DHT process first and loads the client parts (which import transformers) while
the DHT joins the swarm; the ledger (SQLModel) and the web app are imported only when needed, so
`coop coordinator start` imports nothing heavy before that fork.

Shutdown is declared once: every part pushes its own stop onto one exit stack as it starts, so the
process stops them in the reverse order (the trust follower, the books, the swarm views, the
revocation watcher, the channels to nodes, the DHT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from coop.config import CoordinatorSettings
from coop.coordinator.catalog import ModelCatalog, ServedModel
from coop.coordinator.http.auth import ApiKeyGate
from coop.coordinator.http.limits import HttpLimits
from coop.coordinator.remote_backend import RemoteBackend, ping
from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.coordinator.spot_checks.trust_book import TrustBook, ledger_audit
from coop.pool.ca import ROLE_COORDINATOR
from coop.pool.membership import Membership
from coop.pool.registry import REVOCATIONS_FILE
from coop.swarm.announcement import NodeAnnouncement, announcement_validator
from coop.swarm.directory import SwarmDirectory
from coop.swarm.revocations import RevocationWatcher
from coop.swarm.trust import trust_from_ledger
from coop.swarm.validation import pool_record_validator
from coop.swarm.view import SwarmView
from coop.wire.channels import ChannelPool

if TYPE_CHECKING:
    from fastapi import FastAPI

    from coop.coordinator.accounts.bookkeeping import Bookkeeping
    from coop.model.client_part import ClientPart

log = logging.getLogger(__name__)

READY_MARKER = "COOP_COORDINATOR_READY"


class Coordinator:
    """The coordinator process: built by `create`, served by `run`, which also shuts it down."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        membership: Membership,
        directory: SwarmDirectory,
        backends: Sequence[RemoteBackend],
        app: FastAPI,
        stack: AsyncExitStack,
    ) -> None:
        self.settings = settings
        self.membership = membership
        self.directory = directory
        self.backends = backends
        self.app = app
        self._stack = stack

    @classmethod
    async def serve(cls, settings: CoordinatorSettings) -> None:
        """Create the coordinator and run it until it stops (the CLI's entry)."""
        coordinator = await cls.create(settings)
        await coordinator.run()

    @classmethod
    async def create(cls, settings: CoordinatorSettings) -> Coordinator:
        """Join the swarm, load the models' client parts, start the views, the books and the HTTP app."""
        membership = Membership.load(settings.member_bundle, pool_id=settings.pool_id).require(ROLE_COORDINATOR)
        stack = AsyncExitStack()
        try:
            directory, clients = await _join_and_load(settings, membership, stack)
            book = TrustBook(SpotCheckPolicy.from_settings(settings))
            backends = _remote_backends(settings, membership, directory, clients, book, stack)
            pool_list = [] if settings.pool_dir is None else [settings.pool_dir / REVOCATIONS_FILE]
            watcher = RevocationWatcher(membership.revocations, directory, files=pool_list)
            await asyncio.to_thread(watcher.start)
            stack.callback(watcher.stop)
            for backend in backends:
                await backend.swarm.start()
                stack.push_async_callback(backend.swarm.stop)
            bookkeeping = await _keep_books(settings, membership, backends, book, stack)
            app = _web_app(settings, membership, backends, bookkeeping)
        except BaseException:
            await stack.aclose()
            raise
        return cls(settings, membership, directory, backends, app, stack)

    async def run(self) -> None:
        """Serve the HTTP API until uvicorn stops (on a signal), then stop everything `create` started."""
        async with self._stack:
            # log_config=None: uvicorn's records go through the process's handler (--log-format)
            # proxy_headers=False: uvicorn would take X-Forwarded-For from local peers as the client; the admin
            # sign-in throttle reads it itself, from trusted proxies only (settings.trusted_proxies)
            config = uvicorn.Config(
                self.app,
                host=self.settings.host,
                port=self.settings.port,
                log_level="warning",
                log_config=None,
                proxy_headers=False,
            )
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if server.started:
                port = server.servers[0].sockets[0].getsockname()[1]
                print(f"{READY_MARKER} {json.dumps(self._ready(port))}", flush=True)
            await serving

    def _ready(self, port: int) -> dict[str, object]:
        """The readiness line's JSON: what a launcher needs to reach this coordinator and its swarm."""
        return {
            "url": f"http://{self.settings.host}:{port}",
            "dht_maddrs": self.directory.visible_maddrs(),
            "pool_id": self.membership.pool_id,
            "tls": self.membership.secure,
            "models": [backend.model_name for backend in self.backends],
        }


async def _join_and_load(
    settings: CoordinatorSettings, membership: Membership, stack: AsyncExitStack
) -> tuple[SwarmDirectory, list[ClientPart]]:
    """Fork the DHT and load the client parts while it joins the swarm."""
    directory = SwarmDirectory.launch(
        list(settings.initial_peers), settings.host, 0, validator=pool_record_validator(membership)
    )
    stack.push_async_callback(asyncio.to_thread, directory.shutdown)
    joined = asyncio.create_task(asyncio.to_thread(directory.wait_ready))
    stack.push_async_callback(_settled, joined)  # before the DHT shuts down, whether it joined or not
    clients, _ = await asyncio.gather(asyncio.to_thread(_load_clients, settings.model_dirs, settings.device), joined)
    return directory, clients


def _remote_backends(
    settings: CoordinatorSettings,
    membership: Membership,
    directory: SwarmDirectory,
    clients: Sequence[ClientPart],
    book: TrustBook,
    stack: AsyncExitStack,
) -> list[RemoteBackend]:
    """One backend per model, each with its own view of the swarm and channels to its nodes."""
    sign_route = membership.credentials.sign if membership.credentials is not None else None
    backends: list[RemoteBackend] = []
    for client in clients:
        manifest = client.manifest
        channels = ChannelPool(membership.channel_security())
        stack.push_async_callback(channels.close)
        swarm = SwarmView(
            directory,
            pool_id=membership.pool_id,
            model_hash=manifest.content_hash,
            num_blocks=manifest.num_blocks,
            refresh_s=settings.refresh_s,
            validator=announcement_validator(membership),
            revoked=membership.revocations,
            ping=partial(ping, channels),
            # SwarmView still excludes by node id (coop/swarm/view.py), so every node of a quarantined id
            quarantined=lambda: frozenset(node.node_id for node in book.quarantined()),
        )
        backends.append(RemoteBackend(client, swarm, settings, channels, book, sign_route))
    return backends


async def _keep_books(
    settings: CoordinatorSettings,
    membership: Membership,
    backends: Sequence[RemoteBackend],
    book: TrustBook,
    stack: AsyncExitStack,
) -> Bookkeeping | None:
    """With a member bundle, open the ledger and keep the pool's accounts; the spot checks' verdicts
    then go to and come from its audit trail. Without one (development), no accounts are kept."""
    if membership.bundle is None:
        return None
    from coop.coordinator.accounts.bookkeeping import Bookkeeping

    def live_nodes() -> list[NodeAnnouncement]:
        return [node for backend in backends for node in backend.swarm.live_nodes()]

    manifests = [backend.client.manifest for backend in backends]
    default = backends[0]
    bookkeeping = await Bookkeeping.start(
        settings, membership.bundle, membership.revocations, manifests, lambda: default.channels, live_nodes
    )
    stack.push_async_callback(bookkeeping.close)
    ledger = bookkeeping.ledger
    actor = f"coordinator:{membership.bundle.institution}"
    trust = asyncio.create_task(book.follow(ledger_audit(ledger, actor), partial(trust_from_ledger, ledger)))
    stack.push_async_callback(_cancelled, trust)
    return bookkeeping


def _web_app(
    settings: CoordinatorSettings,
    membership: Membership,
    backends: Sequence[RemoteBackend],
    bookkeeping: Bookkeeping | None,
) -> FastAPI:
    """The OpenAI-compatible API, with the admin view when this coordinator keeps a pool's books."""
    from coop.admin import AdminContext, mount_admin
    from coop.admin.auth import SignInThrottle
    from coop.coordinator.http.app import create_app
    from coop.coordinator.http.metrics import CoordinatorMetrics  # pulls in the text pipeline: after the join

    catalog = ModelCatalog([ServedModel(b, b.swarm.missing_blocks, b.swarm.refresh) for b in backends])
    metrics = CoordinatorMetrics()
    if bookkeeping is not None:
        metrics.watch_bookkeeping(bookkeeping)
    app = create_app(
        catalog,
        keys=ApiKeyGate(settings.api_keys, membership.bundle.limits if membership.bundle else None),
        access=bookkeeping.access if bookkeeping else None,
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
            sign_in=SignInThrottle(
                settings.admin_sign_in_burst, settings.admin_sign_in_refill_s, trusted_proxies=settings.trusted_proxies
            ),
            receipt_collection=bookkeeping.collector.stats,
        )
        mount_admin(app, admin)
    return app


async def _settled(task: asyncio.Task[None]) -> None:
    await asyncio.gather(task, return_exceptions=True)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _load_clients(model_dirs: Sequence[Path], device: str) -> list[ClientPart]:
    """One after the other: transformers' meta-device skeletons are not built safely in parallel threads."""
    from coop.model.client_part import ClientPart

    return [ClientPart.load(model_dir, device=device) for model_dir in model_dirs]
