"""`coop node start`: load a span, serve it over gRPC, keep it announced in the DHT.

Start-up is ordered for the time to serving, never at the cost of serving early (and `coop node start`
pauses cyclic collection until the node serves, see coop.startup):
1. The DHT process is forked first, before this process starts any thread, and joins the swarm
   while this process imports the engine (transformers) and loads its blocks.
2. As soon as the blocks are loaded the gRPC port opens and the node announces itself, with a
   conservative throughput estimate (`estimate_throughput`): a node is never routed to before it
   can serve, and never oversells itself.
3. The real throughput is measured in the background and announced when known.
With `--gpu-yield-below-gib` it pauses while local processes need the GPU (coop/node/memory_yield.py).
With `--blocks auto` the node starts on the window, of any of its models, where the pool needs it most,
and keeps moving there as the pool changes (coop/node/rebalancing.py; off with `--no-rebalance`).
On SIGTERM/SIGINT (or `coop node drain`) it drains (coop/node/drain.py): it opens no new session,
announces that it is draining, and waits until its coordinators moved or finished every session,
or until the drain deadline; then it withdraws its announcement and stops. A second signal stops
it at once.

The engine and service modules (which import transformers) are imported only in `Node.create`,
after the fork, so that the import overlaps the DHT's join; this module imports only what the
DHT needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import importlib
import json
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from coop.config import NodeSettings
from coop.model.manifest import Manifest
from coop.node.drain import ServingState, control_socket_path, prepare_control_socket
from coop.node.limits import NodeLimits
from coop.node.metrics import NodeMetrics
from coop.node.outbox import Outbox
from coop.node.placement import pick_placement, servable_models
from coop.node.rebalancing import ListNodes, RebalancePolicy, Rebalancer, ServableModel
from coop.node.receipt_batches import ReceiptWriter
from coop.node.serving_hours import parse_serving_hours
from coop.node.throughput import Measure, estimate_throughput, measure_throughput
from coop.pool.membership import Membership
from coop.startup import resume_collection
from coop.swarm.announcement import DRAINING, MAX_ANNOUNCED_SESSIONS, announcement_validator
from coop.swarm.directory import Announcer, SwarmDirectory
from coop.swarm.revocations import RevocationWatcher
from coop.swarm.validation import pool_record_validator
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2_grpc

if TYPE_CHECKING:
    from coop.model.engine import SpanEngine
    from coop.node.service import NodeService

log = logging.getLogger(__name__)

READY_MARKER = "COOP_NODE_READY"
MEASURED_MARKER = "COOP_NODE_MEASURED"
SHUTDOWN_GRACE_S = 3.0


async def run_node(settings: NodeSettings, measure: Measure | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation): `coop node start`."""
    node = await Node.create(settings, measure)
    await node.run()


@dataclass
class Node:
    """The node process: its DHT peer, its span served over gRPC, its announcement, the work beside them.

    Each part's shutdown is pushed on `stack` as the part is created, so the parts stop in the reverse
    order of their start: the background work first, the DHT peer last."""

    settings: NodeSettings
    measure: Measure  # how the background measurement runs
    models: dict[str, ServableModel]
    membership: Membership
    directory: SwarmDirectory
    list_nodes: ListNodes  # the announcements of a model's nodes, as the swarm shows them
    service: NodeService
    announcer: Announcer
    endpoint: str
    metrics_url: str | None
    control_socket: Path
    stack: contextlib.AsyncExitStack
    background: set[asyncio.Task[None]] = field(default_factory=set)
    announcing: set[asyncio.Task[None]] = field(default_factory=set)  # awaited at shutdown, not cancelled

    @classmethod
    async def create(cls, settings: NodeSettings, measure: Measure | None = None) -> Node:
        """Join the swarm, load the span, serve it and announce it. `measure`: default
        `measure_throughput`, looked up when the node starts."""
        stack = contextlib.AsyncExitStack()
        try:
            return await cls._start(settings, measure or measure_throughput, stack)
        except BaseException:
            await stack.aclose()
            raise

    @classmethod
    async def _start(cls, settings: NodeSettings, measure: Measure, stack: contextlib.AsyncExitStack) -> Node:
        hours = parse_serving_hours(settings.serving_hours) if settings.serving_hours else None
        models = servable_models(settings)
        serving = ServingState(drain_deadline_s=settings.drain_deadline_s, hours=hours)
        if hours is not None:
            serving.apply_hours(datetime.datetime.now().time())
        node_id = settings.node_id or f"node-{uuid.uuid4().hex[:12]}"
        membership = Membership.load(
            settings.member_bundle, node_id=node_id, institution=settings.institution, pool_id=settings.pool_id
        )
        if settings.member_bundle is None:
            log.warning("development mode: no --member bundle, so plaintext gRPC and unsigned announcements")
        directory = SwarmDirectory.launch(
            list(settings.initial_peers), settings.host, settings.dht_port, validator=pool_record_validator(membership)
        )
        stack.push_async_callback(asyncio.to_thread, directory.shutdown)
        watcher = RevocationWatcher(membership.revocations, directory)
        stack.callback(watcher.stop)
        joined = asyncio.create_task(_join(directory, watcher))
        stack.callback(joined.cancel)
        validator = announcement_validator(membership)
        list_nodes = functools.partial(directory.list_nodes, membership.pool_id, validator=validator)
        engine = await _load_span(settings, models, list_nodes, node_id, joined)
        control_socket = settings.control_socket or control_socket_path(node_id)
        prepare_control_socket(control_socket)
        stack.callback(control_socket.unlink, missing_ok=True)
        receipts = _receipt_writer(settings, membership, engine.manifest, node_id, stack)
        from coop.node.service import NodeService  # imports transformers: only once the DHT process is forked

        metrics = NodeMetrics()
        service = NodeService(
            engine,
            node_id=node_id,
            institution=membership.institution,
            throughput_tps=estimate_throughput(engine.manifest, engine.start, engine.end, engine.device.type),
            security=membership.channel_security(),
            authorize=metrics.counting_refusals(membership.authorize),
            limits=NodeLimits.from_settings(settings),
            receipts=receipts,
            step_seconds=metrics.step_seconds.observe,
            serving=serving,
        )
        stack.push_async_callback(service.close)
        port = await _serve_grpc(settings, membership, service, control_socket, stack)
        stack.callback(metrics.stop)
        metrics_url = None
        if settings.metrics_port is not None:
            outbox = None if receipts is None else receipts.outbox
            metrics_port = metrics.serve(service.info, outbox, settings.metrics_host, settings.metrics_port)
            metrics_url = f"http://{settings.metrics_host}:{metrics_port}/metrics"
        endpoint = settings.public_endpoint or f"{settings.announce_host or settings.host}:{port}"
        describe = functools.partial(_announcement, membership, service, endpoint)
        announcer = Announcer(directory, describe, ttl_s=settings.announce_ttl_s, bundle=membership.credentials)
        stack.push_async_callback(asyncio.to_thread, announcer.stop)
        await asyncio.to_thread(announcer.start)
        return cls(
            settings=settings,
            measure=measure,
            models=models,
            membership=membership,
            directory=directory,
            list_nodes=list_nodes,
            service=service,
            announcer=announcer,
            endpoint=endpoint,
            metrics_url=metrics_url,
            control_socket=control_socket,
            stack=stack,
        )

    async def run(self) -> None:
        """Serve until stopped (a second signal, or the end of a drain; see `_drain_on_signal`), then shut down."""
        async with self.stack:
            service, serving, settings = self.service, self.service.serving, self.settings
            stop = _drain_on_signal(serving)
            # announcements are awaited, not cancelled, once no background work can start another:
            # none may land after the withdrawal
            self.stack.push_async_callback(_gather_all, self.announcing)
            self.stack.callback(_cancel_all, self.background)
            serving.listeners.append(
                lambda state: _spawn(self.announcing, asyncio.to_thread(self.announcer.announce_once))
            )
            _spawn(self.background, serving.wait_drained(lambda: service.session_count), then=stop.set)
            if serving.hours is not None:
                _spawn(self.background, serving.follow_hours())
            if settings.gpu_yield_below_gib:
                _spawn(self.background, _yield_memory(settings, serving, service.engine, lambda: service.session_count))
            print(f"{READY_MARKER} {json.dumps(self._ready())}", flush=True)
            resume_collection()
            measuring = asyncio.create_task(
                _measure_and_announce(service.engine, service, self.announcer, self.measure)
            )
            self.stack.callback(measuring.cancel)
            if settings.rebalance and settings.blocks == "auto":
                _spawn(self.background, self._rebalancer().run())
            await stop.wait()
            log.info("shutting down: withdrawing announcement, draining calls …")

    def _ready(self) -> dict[str, object]:
        """The ready line's fields: what `coop node start`'s caller (a test, a launcher) reads to reach the node."""
        engine = self.service.engine
        return {
            "node_id": self.service.node_id,
            "endpoint": self.endpoint,
            "model_hash": engine.manifest.content_hash,
            "start": engine.start,
            "end": engine.end,
            "throughput_tps": round(self.service.throughput_tps, 2),
            "throughput_measured": False,
            "dht_maddrs": self.directory.visible_maddrs(),
            "pool_id": self.membership.pool_id,
            "institution": self.membership.institution,
            "tls": self.membership.secure,
            "metrics_url": self.metrics_url,
            "control_socket": str(self.control_socket),
            "state": self.service.serving.state,
        }

    def _rebalancer(self) -> Rebalancer:
        settings, service, device_type = self.settings, self.service, self.service.engine.device.type
        return Rebalancer(
            node_id=service.node_id,
            models=self.models,
            policy=RebalancePolicy(
                settings.rebalance_interval_s, settings.rebalance_threshold, settings.rebalance_dwell_s
            ),
            list_nodes=self.list_nodes,
            service=service,
            serving=service.serving,
            announcer=self.announcer,
            directory=self.directory,
            credentials=self.membership.credentials,
            load=lambda to, first, last: _load_engine(settings, to, first, last),
            estimate=lambda of, first, last: estimate_throughput(of, first, last, device_type),
            measure=lambda: _measure_and_announce(service.engine, service, self.announcer, self.measure),
        )


async def _load_span(
    settings: NodeSettings,
    models: dict[str, ServableModel],
    list_nodes: ListNodes,
    node_id: str,
    joined: asyncio.Task[None],
) -> SpanEngine:
    """Load the span the node starts on, while the DHT joins the swarm; returns once both are done."""
    # --blocks auto: the window where the pool needs the node most, as the swarm shows it once joined
    if settings.blocks == "auto":
        await asyncio.gather(joined, asyncio.to_thread(importlib.import_module, "coop.model.engine"))
    place = await asyncio.to_thread(pick_placement, settings, models, list_nodes, node_id, estimate_throughput)
    start, end, model = place.start, place.end, models[place.model_hash]
    log.info("loading blocks %d:%d of %s …", start, end, model.manifest.name, extra={"start": start, "end": end})
    engine, _ = await asyncio.gather(asyncio.to_thread(_load_engine, settings, model, start, end), joined)
    return engine


def _receipt_writer(
    settings: NodeSettings, membership: Membership, manifest: Manifest, node_id: str, stack: contextlib.AsyncExitStack
) -> ReceiptWriter | None:
    """In a pool with an outbox: what signs a receipt for every batch of every session (None otherwise)."""
    outbox_path = settings.resolved_outbox_path()
    if membership.credentials is None or outbox_path is None:
        return None
    outbox = Outbox(outbox_path, retention_s=settings.outbox_retention_s, max_rejected=settings.outbox_max_rejected)
    stack.callback(outbox.close)
    return ReceiptWriter(
        membership.credentials,
        outbox,
        manifest,
        node_id,
        batch_tokens=settings.receipt_batch_tokens,
        batch_s=settings.receipt_batch_s,
    )


async def _serve_grpc(
    settings: NodeSettings,
    membership: Membership,
    service: NodeService,
    control_socket: Path,
    stack: contextlib.AsyncExitStack,
) -> int:
    """Serve the node's gRPC on its port and, for its owner, on its control socket; returns the port."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    stack.push_async_callback(server.stop, SHUTDOWN_GRACE_S)
    coop_pb2_grpc.add_NodeServicer_to_server(service, server)
    port = membership.add_port(server, f"{settings.host}:{settings.port}")
    server.add_insecure_port(f"unix:{control_socket}")
    await server.start()
    return port


def _announcement(membership: Membership, service: NodeService, endpoint: str) -> dict[str, object]:
    """What the node announces, fresh each round."""
    engine = service.engine  # a rebalance move changes it
    return {
        "node_id": service.node_id,
        "pool_id": membership.pool_id,
        "model_hash": engine.manifest.content_hash,
        "start": engine.start,
        "end": engine.end,
        "endpoint": endpoint,
        "institution": membership.institution,
        "throughput_tps": service.throughput_tps,
        "free_cache_bytes": engine.free_cache_bytes,
        "state": service.serving.state,
        "active_sessions": min(service.session_count, MAX_ANNOUNCED_SESSIONS),
    }


async def _join(directory: SwarmDirectory, watcher: RevocationWatcher) -> None:
    """Wait for the DHT to join the swarm, then read the pool's revocations before anyone is served."""
    await asyncio.to_thread(directory.wait_ready)
    await asyncio.to_thread(watcher.start)


def _load_engine(settings: NodeSettings, model: ServableModel, start: int, end: int) -> SpanEngine:
    from coop.model.engine import SpanEngine

    return SpanEngine.load(
        model.directory,
        start,
        end,
        device=settings.device,
        cache_budget_bytes=settings.cache_budget_mb << 20,
        idle_timeout_s=settings.idle_timeout_s,
        weight_layout=settings.cpu_weight_layout,
        batch_rows=settings.max_batch_steps,
    )


async def _yield_memory(
    settings: NodeSettings, serving: ServingState, engine: SpanEngine, sessions: Callable[[], int]
) -> None:
    """`--gpu-yield-below-gib`: step aside while local processes need the GPU's memory (coop.node.memory_yield)."""
    if engine.device.type != "cuda":
        log.warning("--gpu-yield-below-gib applies to a GPU; this node runs on %s, so it never yields", engine.device)
        return
    from coop.node.memory_yield import MemoryYield, cuda_available_bytes, follow_memory

    watch = MemoryYield(int(settings.gpu_yield_below_gib * 2**30), settings.gpu_yield_resume_s)
    await follow_memory(serving, watch, lambda: cuda_available_bytes(engine.device), sessions, torch.cuda.empty_cache)


async def _measure_and_announce(
    engine: SpanEngine, service: NodeService, announcer: Announcer, measure: Measure
) -> None:
    """Measure the span's real throughput beside serving, then announce it at once (not at the next refresh)."""
    try:
        throughput = await asyncio.to_thread(measure, engine)
    except Exception:
        log.exception("could not measure throughput; the node keeps announcing its estimate")
        return
    if service.engine is not engine:
        return  # the node moved meanwhile (rebalancing): this span is no longer served
    service.throughput_tps = throughput
    await asyncio.to_thread(announcer.announce_once)
    print(f"{MEASURED_MARKER} {json.dumps({'throughput_tps': round(throughput, 2)})}", flush=True)


def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()


async def _gather_all(tasks: set[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def _spawn(tasks: set[asyncio.Task[None]], work: Awaitable[object], then: Callable[[], None] | None = None) -> None:
    """Run `work` in the background, keeping a reference to it; call `then` when it returns."""

    async def run() -> None:
        try:
            await work
        except Exception:  # e.g. an announcement the DHT did not take: the periodic one follows
            log.exception("background work of the node failed")
            return
        if then is not None:
            then()

    task = asyncio.get_running_loop().create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _drain_on_signal(serving: ServingState) -> asyncio.Event:
    """The first SIGTERM or SIGINT drains the node; a second one sets the returned event: stop now.
    Installed before readiness is announced, for the same reason as `_stop_on_signal`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        if serving.state == DRAINING:
            stop.set()
        else:
            serving.drain()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    return stop


def _stop_on_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT. Install it before announcing readiness: a signal sent as
    soon as the ready line is read must find the handler, not kill the process without a shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_dht(
    initial_peers: list[str], host: str, port: int, membership: Membership, identity_path: Path | None = None
) -> None:
    """A DHT peer that only helps others find each other (any member can run one).

    With a member bundle it holds only records its pool signed, like every other pool process. With an
    identity file its peer id, and so the multiaddr members are given to join through, survives restarts.
    """
    validator = pool_record_validator(membership)
    identity = None if identity_path is None else str(identity_path)
    directory = await asyncio.to_thread(
        SwarmDirectory.start, initial_peers, host, port, validator=validator, identity_path=identity
    )
    try:
        stop = _stop_on_signal()
        print(f"COOP_DHT_READY {json.dumps({'dht_maddrs': directory.visible_maddrs()})}", flush=True)
        await stop.wait()
    finally:
        await asyncio.to_thread(directory.shutdown)
