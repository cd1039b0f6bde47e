"""A node's `/metrics` in Prometheus' text format (`coop node start --metrics-port`).

Almost everything is read at scrape time from what the node keeps anyway (the `NodeInfo` that
`coop node status` shows, and the outbox), so serving adds no bookkeeping of its own: only the
step latency histogram and the count of callers refused for their certificate are recorded as
they happen. The node's state belongs to its event loop, so a scrape (in prometheus_client's
HTTP thread) takes its snapshot there. Each node has a registry of its own, never the global one,
so that several nodes in one process (tests) do not clash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from coop.errors import Unauthorized
from coop.node.outbox import Outbox
from coop.pool.identity import Identity
from coop.wire.generated import coop_pb2 as pb

# From a small model's step on a GPU (~1 ms) to a big span's prefill on a CPU (seconds).
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SNAPSHOT_TIMEOUT_S = 5.0  # a node whose event loop is this stuck answers the scrape with an error
UNAUTHORIZED = "unauthorized"  # the reason of a call refused for its certificate, beside the limits' names

Authorize = Callable[[grpc.aio.ServicerContext], Identity | None]


class NodeMetrics:
    """The registry of one node: create it before the service (which records step latencies into
    it), then `serve` it once the service runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "coop_node_step_seconds",
            "Seconds from a step's acceptance to its output: the wait for the engine and the forward pass",
            buckets=STEP_BUCKETS_S,
            registry=self.registry,
        )
        self.unauthorized = 0
        self._server: WSGIServer | None = None

    def counting_refusals(self, authorize: Authorize) -> Authorize:
        """`authorize` that also counts the callers it refuses (under the reason 'unauthorized')."""

        def vetted(context: grpc.aio.ServicerContext) -> Identity | None:
            try:
                return authorize(context)
            except Unauthorized:
                self.unauthorized += 1
                raise

        return vetted

    def serve(self, info: Callable[[], pb.NodeInfo], outbox: Outbox | None, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port) until `stop`; returns the port.

        `info`: the node's NodeInfo, read on the calling (event loop's) thread at each scrape."""
        loop = asyncio.get_running_loop()

        async def snapshot() -> pb.NodeInfo:
            return info()

        def read() -> pb.NodeInfo:
            return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(SNAPSHOT_TIMEOUT_S)

        self.registry.register(_NodeCollector(read, outbox, lambda: self.unauthorized))
        self._server, _thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _NodeCollector(Collector):
    def __init__(self, info: Callable[[], pb.NodeInfo], outbox: Outbox | None, unauthorized: Callable[[], int]):
        self._info = info
        self._outbox = outbox
        self._unauthorized = unauthorized

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        info = self._info()
        yield InfoMetricFamily(
            "coop_node",
            "What this node serves",
            value={"node_id": info.node_id, "model_hash": info.model_hash, "blocks": f"{info.start}:{info.end}"},
        )
        layout, _, how = info.weight_layout.partition(" ")
        yield InfoMetricFamily(
            "coop_node_weight_layout",
            "The layout the node's Linear weights run in (stock or packed) and how it was chosen",
            value={"layout": layout, "choice": how.strip("()")},
        )
        counters = info.counters
        for name, help_text, total in (
            ("coop_node_steps", "Steps this node ran through its blocks", counters.steps_run),
            ("coop_node_pushes", "Outputs pushed to the next node of a route", counters.pushes_sent),
            ("coop_node_results", "Outputs sent back to a coordinator (last node of a route)", counters.results_sent),
        ):
            yield CounterMetricFamily(name, help_text, value=total)
        rejected = CounterMetricFamily(
            "coop_node_rejected_calls",
            "Calls refused and sessions closed, by the limit hit (the setting's name) or 'unauthorized'",
            labels=["reason"],
        )
        for reason, count in sorted({**counters.limited, UNAUTHORIZED: self._unauthorized()}.items()):
            rejected.add_metric([reason], count)
        yield rejected
        limits = info.limits
        for name, help_text, value in (
            ("coop_node_sessions_active", "Sessions open on this node", info.active_sessions),
            ("coop_node_kv_cache_reserved_bytes", "KV cache reserved by open sessions", info.reserved_cache_bytes),
            ("coop_node_kv_cache_used_bytes", "KV cache the open sessions' tokens fill", info.used_cache_bytes),
            ("coop_node_kv_cache_budget_bytes", "KV cache all sessions may reserve", limits.cache_budget_bytes),
            ("coop_node_steps_queued", "Steps waiting for the engine", info.queued_steps),
            ("coop_node_steps_in_flight", "Steps accepted and not yet run and pushed", info.steps_in_flight),
            ("coop_node_throughput_tokens_per_second", "Decode throughput measured at start", info.throughput_tps),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        counts = self._outbox.counts() if self._outbox is not None else {}
        yield GaugeMetricFamily(
            "coop_node_receipts_pending",
            "Signed receipts in the outbox that no coordinator has booked yet",
            value=counts.get("pending", 0),
        )
        yield GaugeMetricFamily(
            "coop_node_receipts_rejected",
            "Receipts a coordinator rejected, kept in the outbox for the operator",
            value=counts.get("rejected", 0),
        )
