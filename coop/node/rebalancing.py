"""The node's rebalance loop: every few seconds, read the directory and move where the pool needs it.

The rule is `coop.swarm.rebalance.decide`. A move is a planned drain: the node stops taking
sessions and announces that it is draining, so its coordinators move every open session to another
route (as for `coop node drain`, coop/node/drain.py); once none is left it loads its new span (of
any of its models), announces it and serves again. If the sessions could not be moved by the drain
deadline (no other route serves them) it gives the move up and serves on where it was: a move never
drops a session.

Against oscillation, on top of the rule's threshold and hysteresis: a node stays at least `dwell_s`
where it started or last moved, and each evaluation is delayed by a random part of the interval, so
that two nodes seeing the same gap rarely decide in the same instant (the later one sees the first
one's move, or its draining state, and stays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coop.model.manifest import Manifest
from coop.node.drain import ServingState
from coop.pool.bundle import Credentials
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.directory import Announcer, SwarmDirectory
from coop.swarm.rebalance import Candidate, Placement, decide

if TYPE_CHECKING:
    from coop.model.engine import SpanEngine
    from coop.node.service import NodeService

log = logging.getLogger(__name__)

MOVED_MARKER = "COOP_NODE_MOVED"


@dataclass(frozen=True)
class ServableModel:
    """A prepared model the node may serve, and how many of its blocks the node can hold."""

    directory: Path
    manifest: Manifest
    length: int


@dataclass(frozen=True)
class RebalancePolicy:
    interval_s: float
    threshold: float
    dwell_s: float


ListNodes = Callable[[str], list[NodeAnnouncement]]  # the live announcements of one model hash
Estimate = Callable[[Manifest, int, int], float]  # decode tokens/s a span would reach at least here


def candidates(
    models: Mapping[str, ServableModel], current: Placement, measured_tps: float, estimate: Estimate
) -> list[Candidate]:
    """What the node would bring to each model: its measured speed where it is, scaled by the estimates
    elsewhere (another model's blocks may cost more or less than these)."""
    here = models[current.model_hash]
    scale = measured_tps / estimate(here.manifest, current.start, current.end)
    return [
        Candidate(
            model_hash=model_hash,
            num_blocks=model.manifest.num_blocks,
            length=model.length,
            throughput_tps=scale * estimate(model.manifest, 0, min(model.length, model.manifest.num_blocks)),
        )
        for model_hash, model in models.items()
    ]


class Rebalancer:
    """Keeps evaluating the rule and carries out the moves it decides; `run()` until cancelled."""

    def __init__(
        self,
        *,
        node_id: str,
        models: Mapping[str, ServableModel],
        policy: RebalancePolicy,
        list_nodes: ListNodes,
        service: NodeService,
        serving: ServingState,
        announcer: Announcer,
        directory: SwarmDirectory,
        credentials: Credentials | None,
        load: Callable[[ServableModel, int, int], SpanEngine],
        estimate: Estimate,
        measure: Callable[[], Coroutine[object, object, None]],
    ) -> None:
        """`load`: the engine of a span (blocking; run in a thread). `measure`: measures the new span's
        throughput and announces it (after a move, as after the start)."""
        self.node_id = node_id
        self.models = models
        self.policy = policy
        self._list_nodes = list_nodes
        self._service = service
        self._serving = serving
        self._announcer = announcer
        self._directory = directory
        self._credentials = credentials
        self._load = load
        self._estimate = estimate
        self._measure = measure
        self._settled_at = time.monotonic()
        self._measuring: asyncio.Task[None] | None = None

    @property
    def placement(self) -> Placement:
        engine = self._service.engine
        return Placement(engine.manifest.content_hash, engine.start, engine.end)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.policy.interval_s * random.uniform(0.5, 1.5))
                if self._serving.state != SERVING or time.monotonic() - self._settled_at < self.policy.dwell_s:
                    continue  # paused or draining (the owner decides), or not here long enough
                target = await asyncio.to_thread(self.evaluate)
                if target is not None:
                    await self.move(target)
        finally:
            if self._measuring is not None:
                self._measuring.cancel()

    def evaluate(self) -> Placement | None:
        """Where the rule says to move now (None: stay). Blocking: reads the directory."""
        current = self.placement
        live = {model_hash: self._list_nodes(model_hash) for model_hash in self.models}
        mine = candidates(self.models, current, self._service.throughput_tps, self._estimate)
        return decide(self.node_id, current, mine, live, threshold=self.policy.threshold)

    async def move(self, target: Placement) -> None:
        """Drain as a planned move, load `target`, announce it and serve again; give up if not drained in time."""
        before = self.placement
        log.info("rebalancing: moving from %s to %s; draining first", _show(before), _show(target))
        self._serving.begin_move()
        try:
            left = await self._serving.wait_sessions_moved(lambda: self._service.session_count, "before moving")
            if left or self._serving.exiting:
                log.warning("rebalancing: %d sessions could not be moved off; staying on %s", left, _show(before))
                return
            model = self.models[target.model_hash]
            try:
                engine = await asyncio.to_thread(self._load, model, target.start, target.end)
            except Exception:  # e.g. out of memory beside the span it serves: serve on where it was
                log.exception("rebalancing: could not load %s; staying on %s", _show(target), _show(before))
                return
            old_record = self._announcer.last
            self._service.serve_span(engine)
            self._service.throughput_tps = self._estimate(model.manifest, target.start, target.end)
            if target.model_hash != before.model_hash and old_record is not None:  # filed under the old model
                await asyncio.to_thread(self._directory.withdraw, old_record, self._credentials)
        finally:
            self._settled_at = time.monotonic()
            self._serving.end_move()  # announces the node (serving again) on its span, old or new
        moved = {"model_hash": target.model_hash, "start": target.start, "end": target.end}
        print(f"{MOVED_MARKER} {json.dumps(moved)}", flush=True)
        if self._measuring is not None:
            self._measuring.cancel()
        self._measuring = asyncio.create_task(self._measure())


def _show(place: Placement) -> str:
    return f"blocks {place.start}:{place.end} of model {place.model_hash[:12]}"
