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

The engine and service modules (which import transformers) are imported only in `run_node`,
after the fork, so that the import overlaps the DHT's join; this module imports only what the
DHT needs.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from coop.config import NodeSettings
from coop.errors import InvalidInput
from coop.model.manifest import Manifest
from coop.node.drain import ServingState, control_socket_path, prepare_control_socket
from coop.node.limits import NodeLimits
from coop.node.metering import ReceiptWriter
from coop.node.metrics import NodeMetrics
from coop.node.outbox import Outbox
from coop.node.rebalancing import ListNodes, RebalancePolicy, Rebalancer, ServableModel
from coop.node.serving_hours import parse_serving_hours
from coop.pool.membership import Membership
from coop.startup import resume_collection
from coop.swarm.announcement import DRAINING, MAX_ANNOUNCED_SESSIONS, NodeAnnouncement, announcement_validator
from coop.swarm.directory import Announcer, SwarmDirectory
from coop.swarm.rebalance import Candidate, Placement, decide
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
_THROUGHPUT_STEPS = 8

# What a decode token costs at least, per device type, for the estimate announced before the
# measurement: a fixed overhead per block (kernel launches, Python) plus every active weight of
# the span read once at a memory bandwidth well under any real machine's (a laptop CPU streams
# ~10 GB/s, a GPU hundreds).
_BLOCK_OVERHEAD_S = {"cpu": 2e-3, "cuda": 1e-3}
_WEIGHT_BYTES_PER_S = {"cpu": 1e9, "cuda": 50e9}

Measure = Callable[["SpanEngine"], float]


def parse_blocks(text: str, num_blocks: int) -> tuple[int, int] | None:
    """'A:B' -> (A, B); 'auto' -> None."""
    if text == "auto":
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError as exc:
        raise InvalidInput(f"--blocks must be START:END or auto, got {text!r}") from exc
    if not 0 <= start < end <= num_blocks:
        raise InvalidInput(f"--blocks {text} does not fit the model's blocks 0:{num_blocks}")
    return start, end


def servable_models(settings: NodeSettings) -> dict[str, ServableModel]:
    """The node's models by content hash, each with how many of its blocks the node can hold."""
    models: dict[str, ServableModel] = {}
    for directory in (settings.model_dir, *settings.more_model_dirs):
        manifest = Manifest.load(directory)
        if manifest.content_hash in models:
            raise InvalidInput(f"{directory} is the same model as {models[manifest.content_hash].directory}")
        length = settings.max_blocks or max(1, settings.memory_budget_bytes // manifest.largest_block_bytes)
        models[manifest.content_hash] = ServableModel(directory, manifest, min(length, manifest.num_blocks))
    return models


def pick_placement(
    settings: NodeSettings, models: dict[str, ServableModel], list_nodes: ListNodes, node_id: str
) -> Placement:
    """--blocks A:B of the first model, or (auto) the window of any model where the pool needs this node most."""
    first = next(iter(models.values()))
    explicit = parse_blocks(settings.blocks, first.manifest.num_blocks)
    if explicit is not None:
        return Placement(first.manifest.content_hash, *explicit)
    from coop.model.loading import resolve_device  # imports transformers: only once the DHT process is forked

    device_type = resolve_device(settings.device).type
    mine = [
        Candidate(h, m.manifest.num_blocks, m.length, estimate_throughput(m.manifest, 0, m.length, device_type))
        for h, m in models.items()
    ]
    placement = decide(node_id, None, mine, {h: list_nodes(h) for h in models})
    assert placement is not None  # decide always places a node that has no placement yet
    return placement


def estimate_throughput(manifest: Manifest, start: int, end: int, device_type: str) -> float:
    """Decode tokens per second that blocks [start, end) reach at least: what a node announces until measured."""
    weight_bytes = sum(b.active_param_count for b in manifest.blocks[start:end]) * manifest.bytes_per_weight
    overhead_s = _BLOCK_OVERHEAD_S.get(device_type, _BLOCK_OVERHEAD_S["cpu"])
    bandwidth = _WEIGHT_BYTES_PER_S.get(device_type, _WEIGHT_BYTES_PER_S["cpu"])
    return 1.0 / ((end - start) * overhead_s + weight_bytes / bandwidth)


def measure_throughput(engine: SpanEngine) -> float:
    """Decode tokens per second through the whole span, measured on a throwaway session."""
    session = engine.open_session(max_length=_THROUGHPUT_STEPS + 1)
    try:
        hidden = torch.zeros(1, 1, engine.hidden_size, dtype=engine.dtype)
        engine.step(session, hidden, 0)  # warm-up
        started = time.perf_counter()
        for position in range(1, _THROUGHPUT_STEPS + 1):
            engine.step(session, hidden, position)
        return _THROUGHPUT_STEPS / max(time.perf_counter() - started, 1e-6)
    finally:
        engine.close_session(session)


async def run_node(settings: NodeSettings, measure: Measure | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation). `measure`: how the background measurement runs
    (default `measure_throughput`, looked up when the node starts)."""
    measure = measure or measure_throughput
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
    watcher = RevocationWatcher(membership.revocations, directory)
    joined = asyncio.create_task(_join(directory, watcher))
    announcer: Announcer | None = None
    server: grpc.aio.Server | None = None
    service: NodeService | None = None
    measuring: asyncio.Task[None] | None = None
    outbox: Outbox | None = None
    metrics = NodeMetrics()
    background: set[asyncio.Task[None]] = set()
    announcing: set[asyncio.Task[None]] = set()  # awaited, not cancelled: none may land after the withdrawal
    control_socket = settings.control_socket or control_socket_path(node_id)
    listening_on_socket = False
    validator = announcement_validator(membership)

    def list_nodes(model_hash: str) -> list[NodeAnnouncement]:
        return directory.list_nodes(membership.pool_id, model_hash, validator)

    try:
        # --blocks auto: the window where the pool needs the node most, as the swarm shows it once joined
        if settings.blocks == "auto":
            await asyncio.gather(joined, asyncio.to_thread(importlib.import_module, "coop.model.engine"))
        place = await asyncio.to_thread(pick_placement, settings, models, list_nodes, node_id)
        start, end, model = place.start, place.end, models[place.model_hash]
        manifest = model.manifest
        log.info("loading blocks %d:%d of %s …", start, end, manifest.name, extra={"start": start, "end": end})
        engine, _ = await asyncio.gather(asyncio.to_thread(_load_engine, settings, model, start, end), joined)
        from coop.node.service import NodeService

        outbox_path = settings.resolved_outbox_path()
        receipts = None
        if membership.credentials is not None and outbox_path is not None:
            outbox = Outbox(
                outbox_path, retention_s=settings.outbox_retention_s, max_rejected=settings.outbox_max_rejected
            )
            receipts = ReceiptWriter(
                membership.credentials,
                outbox,
                manifest,
                node_id,
                batch_tokens=settings.receipt_batch_tokens,
                batch_s=settings.receipt_batch_s,
            )
        service = node_service = NodeService(
            engine,
            node_id=node_id,
            institution=membership.institution,
            throughput_tps=estimate_throughput(manifest, start, end, engine.device.type),
            security=membership.channel_security(),
            authorize=metrics.counting_refusals(membership.authorize),
            limits=NodeLimits.from_settings(settings),
            receipts=receipts,
            step_seconds=metrics.step_seconds.observe,
            serving=serving,
        )
        server = grpc.aio.server(options=GRPC_OPTIONS)
        coop_pb2_grpc.add_NodeServicer_to_server(service, server)
        port = membership.add_port(server, f"{settings.host}:{settings.port}")
        prepare_control_socket(control_socket)
        server.add_insecure_port(f"unix:{control_socket}")
        listening_on_socket = True
        await server.start()
        endpoint = settings.public_endpoint or f"{settings.announce_host or settings.host}:{port}"
        metrics_url = None
        if settings.metrics_port is not None:
            metrics_port = metrics.serve(service.info, outbox, settings.metrics_host, settings.metrics_port)
            metrics_url = f"http://{settings.metrics_host}:{metrics_port}/metrics"

        def describe() -> dict[str, object]:
            serving_engine = node_service.engine  # a rebalance move changes it
            return {
                "node_id": node_id,
                "pool_id": membership.pool_id,
                "model_hash": serving_engine.manifest.content_hash,
                "start": serving_engine.start,
                "end": serving_engine.end,
                "endpoint": endpoint,
                "institution": membership.institution,
                "throughput_tps": node_service.throughput_tps,
                "free_cache_bytes": serving_engine.free_cache_bytes,
                "state": serving.state,
                "active_sessions": min(node_service.session_count, MAX_ANNOUNCED_SESSIONS),
            }

        announcer = Announcer(directory, describe, ttl_s=settings.announce_ttl_s, bundle=membership.credentials)
        await asyncio.to_thread(announcer.start)
        ready = {
            "node_id": node_id,
            "endpoint": endpoint,
            "model_hash": manifest.content_hash,
            "start": start,
            "end": end,
            "throughput_tps": round(service.throughput_tps, 2),
            "throughput_measured": False,
            "dht_maddrs": directory.visible_maddrs(),
            "pool_id": membership.pool_id,
            "institution": membership.institution,
            "tls": membership.secure,
            "metrics_url": metrics_url,
            "control_socket": str(control_socket),
            "state": serving.state,
        }
        stop = _drain_on_signal(serving)
        serving.listeners.append(lambda state: _spawn(announcing, asyncio.to_thread(announcer.announce_once)))
        _spawn(background, serving.wait_drained(lambda: node_service.session_count), then=stop.set)
        if hours is not None:
            _spawn(background, serving.follow_hours())
        if settings.gpu_yield_below_gib:
            _spawn(background, _yield_memory(settings, serving, engine, lambda: node_service.session_count))
        print(f"{READY_MARKER} {json.dumps(ready)}", flush=True)
        resume_collection()
        measuring = asyncio.create_task(_measure_and_announce(engine, service, announcer, measure))
        if settings.rebalance and settings.blocks == "auto":
            rebalancer = Rebalancer(
                node_id=node_id,
                models=models,
                policy=RebalancePolicy(
                    settings.rebalance_interval_s, settings.rebalance_threshold, settings.rebalance_dwell_s
                ),
                list_nodes=list_nodes,
                service=node_service,
                serving=serving,
                announcer=announcer,
                directory=directory,
                credentials=membership.credentials,
                load=lambda to, first, last: _load_engine(settings, to, first, last),
                estimate=lambda of, first, last: estimate_throughput(of, first, last, engine.device.type),
                measure=lambda: _measure_and_announce(node_service.engine, node_service, announcer, measure),
            )
            _spawn(background, rebalancer.run())
        await stop.wait()
        log.info("shutting down: withdrawing announcement, draining calls …")
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*announcing, return_exceptions=True)
        if measuring is not None:
            measuring.cancel()
        watcher.stop()
        if announcer is not None:
            await asyncio.to_thread(announcer.stop)
        metrics.stop()
        if server is not None:
            await server.stop(SHUTDOWN_GRACE_S)
        if service is not None:
            await service.close()
        if outbox is not None:
            outbox.close()
        if listening_on_socket:
            control_socket.unlink(missing_ok=True)
        if not joined.done():
            joined.cancel()
        await asyncio.to_thread(directory.shutdown)


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
