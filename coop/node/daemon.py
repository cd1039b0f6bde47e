"""`coop node start`: load a span, serve it over gRPC, keep it announced in the DHT.

Start-up order matters for the pool: the span is loaded and measured before the node announces
itself, so a node is never routed to before it can serve; on SIGTERM/SIGINT it withdraws its
announcement first, then drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from pathlib import Path

import grpc
import torch

from coop.config import NodeSettings
from coop.errors import InvalidInput
from coop.model.engine import SpanEngine
from coop.model.manifest import Manifest
from coop.node.limits import NodeLimits
from coop.node.metering import ReceiptWriter
from coop.node.metrics import NodeMetrics
from coop.node.outbox import Outbox
from coop.node.service import NodeService
from coop.pool.membership import Membership
from coop.swarm.announcement import announcement_validator
from coop.swarm.directory import Announcer, SwarmDirectory
from coop.swarm.revocations import RevocationWatcher
from coop.swarm.routing import choose_span, coverage_of
from coop.swarm.validation import pool_record_validator
from coop.wire.channels import GRPC_OPTIONS
from coop.wire.generated import coop_pb2_grpc

log = logging.getLogger(__name__)

READY_MARKER = "COOP_NODE_READY"
SHUTDOWN_GRACE_S = 3.0
_THROUGHPUT_STEPS = 8


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


def pick_span(
    settings: NodeSettings, manifest: Manifest, directory: SwarmDirectory, membership: Membership
) -> tuple[int, int]:
    explicit = parse_blocks(settings.blocks, manifest.num_blocks)
    if explicit is not None:
        return explicit
    itemsize = torch.empty((), dtype=getattr(torch, manifest.dtype)).element_size()
    block_bytes = max(b.param_count for b in manifest.blocks) * itemsize
    length = settings.max_blocks or max(1, settings.memory_budget_bytes // block_bytes)
    live = directory.list_nodes(membership.pool_id, manifest.content_hash, announcement_validator(membership))
    return choose_span(coverage_of(live, manifest.num_blocks), length)


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


async def run_node(settings: NodeSettings) -> None:
    manifest = Manifest.load(settings.model_dir)
    node_id = settings.node_id or f"node-{uuid.uuid4().hex[:12]}"
    membership = Membership.load(
        settings.member_bundle, node_id=node_id, institution=settings.institution, pool_id=settings.pool_id
    )
    if settings.member_bundle is None:
        log.warning("development mode: no --member bundle, so plaintext gRPC and unsigned announcements")
    directory = await asyncio.to_thread(
        SwarmDirectory.start,
        list(settings.initial_peers),
        settings.host,
        settings.dht_port,
        validator=pool_record_validator(membership),
    )
    announcer: Announcer | None = None
    watcher = RevocationWatcher(membership.revocations, directory)
    server: grpc.aio.Server | None = None
    service: NodeService | None = None
    outbox: Outbox | None = None
    receipts: ReceiptWriter | None = None
    metrics = NodeMetrics()
    try:
        await asyncio.to_thread(watcher.start)
        start, end = await asyncio.to_thread(pick_span, settings, manifest, directory, membership)
        log.info("loading blocks %d:%d of %s …", start, end, manifest.name, extra={"start": start, "end": end})
        engine = await asyncio.to_thread(
            SpanEngine.load,
            settings.model_dir,
            start,
            end,
            device=settings.device,
            cache_budget_bytes=settings.cache_budget_bytes,
            idle_timeout_s=settings.idle_timeout_s,
        )
        throughput = await asyncio.to_thread(measure_throughput, engine)
        outbox_path = settings.resolved_outbox_path()
        if membership.credentials is not None and outbox_path is not None:
            outbox = Outbox(outbox_path)
            receipts = ReceiptWriter(membership.credentials, outbox, manifest, node_id)
        service = NodeService(
            engine,
            node_id=node_id,
            institution=membership.institution,
            throughput_tps=throughput,
            security=membership.channel_security(),
            authorize=metrics.counting_refusals(membership.authorize),
            limits=NodeLimits.from_settings(settings),
            receipts=receipts,
            step_seconds=metrics.step_seconds.observe,
        )
        server = grpc.aio.server(options=GRPC_OPTIONS)
        coop_pb2_grpc.add_NodeServicer_to_server(service, server)
        port = membership.add_port(server, f"{settings.host}:{settings.port}")
        await server.start()
        endpoint = settings.public_endpoint or f"{settings.announce_host or settings.host}:{port}"
        metrics_url = None
        if settings.metrics_port is not None:
            metrics_port = metrics.serve(service.info, outbox, settings.metrics_host, settings.metrics_port)
            metrics_url = f"http://{settings.metrics_host}:{metrics_port}/metrics"

        def describe() -> dict[str, object]:
            return {
                "node_id": node_id,
                "pool_id": membership.pool_id,
                "model_hash": manifest.content_hash,
                "start": start,
                "end": end,
                "endpoint": endpoint,
                "institution": membership.institution,
                "throughput_tps": throughput,
                "free_cache_bytes": engine.free_cache_bytes,
            }

        announcer = Announcer(directory, describe, ttl_s=settings.announce_ttl_s, bundle=membership.credentials)
        await asyncio.to_thread(announcer.start)
        ready = {
            "node_id": node_id,
            "endpoint": endpoint,
            "start": start,
            "end": end,
            "throughput_tps": round(throughput, 2),
            "dht_maddrs": directory.visible_maddrs(),
            "pool_id": membership.pool_id,
            "institution": membership.institution,
            "tls": membership.secure,
            "metrics_url": metrics_url,
        }
        stop = _stop_on_signal()
        print(f"{READY_MARKER} {json.dumps(ready)}", flush=True)
        await stop.wait()
        log.info("shutting down: withdrawing announcement, draining calls …")
    finally:
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
        await asyncio.to_thread(directory.shutdown)


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
