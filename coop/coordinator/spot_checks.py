"""Spot checks: re-compute a sample of sessions on other replicas and catch nodes that return wrong activations.

How it works (issue 13):
- Every session's route is opened with a fresh sketch seed (`coop.wire.sketches`), so on every step
  each node appends a sketch of the input it received and the output it pushed on, and the last
  hop returns them all with its result. Checked or not, sessions look the same to a node.
- A sample of sessions is checked: `spot_check_rate`, or `spot_check_new_node_rate` when a node of
  the route has fewer than `spot_check_history_steps` passed checked steps; the choice is made at
  the first step, by the coordinator alone. A checked session's every step is re-computed, before
  its token is released, on a shadow: for each hop, a session over the same blocks on a replica
  route (other nodes, picked at random among those that serve them), driven by the coordinator hop
  by hop, so that it sees every activation. It then compares:
  1. what it sent with hop 0's input sketch, and what it received with the last hop's output sketch
     (a mismatch is a lie about the session's own ends: that hop is at fault);
  2. hop k's output sketch with hop k+1's input sketch (a mismatch: one pushed something other than
     it says, or the other lies about what it got; which one, nobody else saw: a dispute);
  3. hop k's output sketch with the shadow's, whose input equals hop k's once the hops before it
     passed. The distance is per token, relative to what the hop added to the residual stream
     (output minus input), and must stay under `spot_check_tolerance`. The first hop over it is the
     suspect. A third replica route, fed the hop's whole input so far, settles who is right; with
     none, it is a dispute.
- A node found at fault is quarantined: an audit event with the evidence (session, step, hop, node,
  distance) in the ledger, which is also the pool-wide list (`coop.swarm.trust`: every coordinator
  follows it, only coordinators and the admin write it), and no route uses it again; its observation
  of the session is withheld, so its receipt for it is never paid. A dispute is audited, withholds
  both sides' pay for the session and quarantines neither. Either way the session leaves the route
  for one without them, and its tokens are replayed there (`RemoteChain.route_around`): the client
  gets the single-process tokens. A shadow found wrong by the referee is quarantined the same way
  (a lone replica node) or disputed (a replica route of several), and the session goes on.
- Replicas are metered like the session they check, to its consumer: a checked session costs it
  about twice its compute, an average of `spot_check_rate` more.
- Passed and failed checks per node are its trust record (admin view's nodes page, `coop status --pool`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from coop.config import CoordinatorSettings
from coop.errors import CoopError, InvalidTensor, PeerError
from coop.ledger.store import AuditEntry, Ledger
from coop.pipeline.charge import Charge, Meter
from coop.pipeline.remote import RemoteChain, RouteSource, SentStep
from coop.receipts import TokenTally
from coop.swarm.announcement import SERVING, NodeAnnouncement
from coop.swarm.routing import Hop, NodeKey
from coop.swarm.trust import DISPUTED, FAILED, PASSED, QUARANTINED, TrustRecord
from coop.swarm.view import SwarmView
from coop.wire.sketches import relative_distance, sketch, sketches_from_proto

log = logging.getLogger(__name__)

# An honest hop's sketches of the tensor it passes on equal its neighbour's, up to the float rounding
# of a projection computed on another device.
SAME_TENSOR_TOLERANCE = 1e-3

AuditNote = tuple[str, str, str]  # (action, subject, detail), actions from coop.swarm.trust
AuditSink = Callable[[list[AuditNote]], None]  # appends to the ledger's audit trail (blocking)
LedgerTrust = Callable[[], dict[str, TrustRecord]]  # every node's record, as the ledger has it (blocking)
TRUST_REFRESH_S = 5.0  # how often quarantines and lifts by others are read back from the ledger


@dataclass(frozen=True)
class SpotCheckPolicy:
    rate: float  # share of sessions checked
    new_node_rate: float  # the share when a node of the route has little history
    history_steps: int  # passed checked steps below which a node is new
    tolerance: float  # per token: |claimed - recomputed| / |what the hop added|
    sketch_dims: int

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings) -> SpotCheckPolicy:
        return cls(
            settings.spot_check_rate,
            settings.spot_check_new_node_rate,
            settings.spot_check_history_steps,
            settings.spot_check_tolerance,
            settings.sketch_dims,
        )

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.new_node_rate > 0


class TrustBook:
    """What this coordinator knows of every node's honesty, and the sampling it implies.

    Without a ledger the book lives in memory; with one, every verdict is appended to its audit trail
    and the book follows it (`follow`), so quarantines are pool-wide and an admin's lift takes effect.
    """

    def __init__(self, policy: SpotCheckPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.records: dict[str, TrustRecord] = {}
        self.rng = rng or random.Random(secrets.randbits(64))
        self._audit: AuditSink | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._version = 0  # bumped by each verdict here, so a ledger read that raced it is not applied
        self._predecessors: dict[str, set[str]] = {}  # per node, those after whose push it failed a check

    def record(self, node_id: str) -> TrustRecord:
        return self.records.setdefault(node_id, TrustRecord())

    def quarantined(self) -> frozenset[str]:
        return frozenset(n for n, r in self.records.items() if r.quarantined)

    def sampled(self, hops: Sequence[Hop]) -> bool:
        new = any(self.record(h.node_id).passed < self.policy.history_steps for h in hops)
        return self.rng.random() < (self.policy.new_node_rate if new else self.policy.rate)

    def passed(self, counts: Counter[str]) -> None:
        """A checked session ended: its nodes computed these many checked steps right."""
        for node_id, steps in counts.items():
            self.record(node_id).passed += steps
        self._write([(PASSED, node_id, str(steps)) for node_id, steps in counts.items()])

    def convict(self, node_id: str, predecessor: str, evidence: str) -> None:
        """A check proved the node's output wrong, given the input its `predecessor` pushed it.

        A node that knows a session's sketch seed can push a perturbation its sketches do not show
        (coop.wire.sketches), which makes the next hop look wrong. So a node whose input came from
        another node is quarantined only once it failed after two different predecessors; a failure
        on the coordinator's own input (`predecessor` ""), nobody can have framed.
        """
        framers = self._predecessors.setdefault(node_id, set())
        framers.add(predecessor)
        if not predecessor or len(framers) >= 2:
            self.quarantine(node_id, evidence)
            return
        self.record(node_id).failed += 1
        log.warning("node %s failed a check after %s: %s", node_id, predecessor, evidence)
        self._write([(FAILED, node_id, evidence)])

    def quarantine(self, node_id: str, evidence: str) -> None:
        record = self.record(node_id)
        record.failed += 1
        record.quarantined = evidence
        log.warning("node %s quarantined: %s", node_id, evidence)
        self._write([(QUARANTINED, node_id, evidence)])

    def disputed(self, node_ids: Sequence[str], evidence: str) -> None:
        for node_id in node_ids:
            self.record(node_id).disputed += 1
        log.warning("spot check disputed between %s: %s", ", ".join(node_ids), evidence)
        self._write([(DISPUTED, ",".join(node_ids), evidence)])

    def _write(self, notes: list[AuditNote]) -> None:
        self._version += 1
        if self._audit is None or not notes:
            return
        task = asyncio.create_task(self._append(self._audit, notes))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    @staticmethod
    async def _append(audit: AuditSink, notes: list[AuditNote]) -> None:
        try:
            await asyncio.to_thread(audit, notes)
        except Exception as exc:  # the verdict holds here either way; the pool-wide list lags
            log.warning("could not audit %s: %s", notes, exc)

    async def follow(self, audit: AuditSink, read: LedgerTrust, every_s: float = TRUST_REFRESH_S) -> None:
        """Write verdicts to the ledger from now on, and read everyone's back every `every_s`."""
        self._audit = audit
        while True:
            version = self._version
            try:
                records = await asyncio.to_thread(read)
            except Exception as exc:  # a database hiccup must not end the following for good
                log.warning("could not read the nodes' trust records from the ledger: %s", exc)
            else:
                if version == self._version:
                    self.records = records
            await asyncio.sleep(every_s)


@dataclass(frozen=True)
class Verdict:
    """Nodes to route around, and whether the fault is proven (quarantine) or disputed."""

    node_ids: tuple[str, ...]
    proven: bool
    evidence: str
    # the node that pushed the culprit its input ("": the coordinator did, or it lied about its own ends)
    predecessor: str = ""


def ledger_audit(ledger: Ledger, actor: str) -> AuditSink:
    def append(notes: list[AuditNote]) -> None:
        ledger.record_many(
            [AuditEntry(actor, action, subject[:200], detail[:4000]) for action, subject, detail in notes]
        )

    return append


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
    nodes: Sequence[NodeAnnouncement], start: int, end: int, avoid: Collection[str], rng: random.Random
) -> list[Hop] | None:
    """Hops over blocks [start, end) on nodes not in `avoid`, each picked at random among those that
    serve the next block (so no node can count on checking its accomplice); None if they do not tile."""
    hops: list[Hop] = []
    at = start
    while at < end:
        serving = [n for n in nodes if n.start <= at < n.end and n.node_id not in avoid and n.state == SERVING]
        if not serving:
            return None
        node = rng.choice(serving)
        hops.append(Hop(node.node_id, node.endpoint, at, min(node.end, end), node.institution))
        at = hops[-1].end
    return hops


class WithholdingMeter:
    """A meter that writes no observation for the nodes a check found at fault: their receipts go unpaid."""

    def __init__(self, meter: Meter | None) -> None:
        self.meter = meter
        self.withheld: set[str] = set()

    def stepped(self, session_id: str, consumer: str, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        """Checkpoints go on for the others; a culprit keeps only what was observed before it was caught,
        steps that had all passed their checks."""
        if self.meter is not None:
            kept = [h for h in hops if h.node_id not in self.withheld]
            self.meter.stepped(session_id, consumer, kept, tokens, sent)

    def session_ended(self, session_id: str, consumer: str, hops: Sequence[Hop], sent: TokenTally) -> None:
        if self.meter is not None:
            self.meter.session_ended(session_id, consumer, [h for h in hops if h.node_id not in self.withheld], sent)


class SpotChecker:
    """Opens chains whose sampled sessions are checked; one per coordinator."""

    def __init__(
        self, book: TrustBook, swarm: SwarmView, open_replica: Callable[[RouteSource, int, Charge], RemoteChain]
    ) -> None:
        """`open_replica(swarm, max_length, charge)`: an unopened RemoteChain over `swarm`, for shadows."""
        self.book = book
        self.swarm = swarm
        self._open_replica = open_replica

    def charge(self, charge: Charge) -> tuple[Charge, WithholdingMeter]:
        meter = WithholdingMeter(charge.meter)
        return Charge(charge.consumer, charge.priority, meter), meter

    async def replica(self, hop: Hop, avoid: set[str], max_length: int, charge: Charge) -> RemoteChain | None:
        """A session over blocks [hop.start, hop.end) on nodes not in `avoid`, or None if they cannot open one.
        `charge`: the checked session's, so that replicas are paid for the check like for any session."""
        route = replica_route(
            self.swarm.live_nodes(), hop.start, hop.end, avoid | self.book.quarantined(), self.book.rng
        )
        if route is None:
            return None
        chain = self._open_replica(_FixedRoute(route, self.swarm), max_length, charge)
        try:
            return await chain.open()
        except CoopError as exc:
            log.info("replica route %s for blocks %d:%d did not open: %s", route, hop.start, hop.end, exc)
            return None


class _Shadow:
    """One replica per hop of the checked route, with every input it was given so far."""

    def __init__(self, session_id: str, hops: list[Hop], replicas: list[RemoteChain]) -> None:
        self.session_id = session_id
        self.hops = hops
        self.replicas = replicas
        self.inputs: list[list[torch.Tensor]] = [[] for _ in hops]

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()


def _whole(hidden: torch.Tensor) -> torch.Tensor:
    """(1, n, hidden) -> (n, hidden) float32: what `relative_distance` compares."""
    return hidden[0].float().cpu()


class CheckedChain:
    """A `coop.pipeline.generation.Chain`: a RemoteChain whose steps, in a sampled session, are checked
    before they are returned."""

    def __init__(self, chain: RemoteChain, checker: SpotChecker, meter: WithholdingMeter) -> None:
        self.chain = chain
        self.checker = checker
        self._meter = meter
        self._replica_charge = Charge(chain.charge.consumer, chain.charge.priority, meter.meter)
        self._sampled: bool | None = None  # decided at the first step, on the first route
        self._shadow: _Shadow | None = None
        self._history: list[torch.Tensor] = []  # what the route's first hop got so far: a new shadow's catch-up
        self._passed: Counter[str] = Counter()  # checked steps per node that passed, in this session
        self._steps = 0

    @property
    def hops(self) -> list[Hop]:
        return self.chain.hops

    @property
    def failovers(self) -> int:
        return self.chain.failovers

    @property
    def draft_tokens(self) -> int:
        return self.chain.draft_tokens

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        if self._sampled is None:
            self._sampled = self.checker.book.sampled(self.chain.hops)
        while True:
            output = await self.chain.step(hidden, start_position, token_ids)
            if not self._sampled:
                return output
            self._steps += 1
            verdict = await self._check()
            if verdict is None or not verdict.node_ids:
                return output
            self._meter.withheld.update(verdict.node_ids)
            if verdict.proven:
                for node_id in verdict.node_ids:
                    self.checker.book.convict(node_id, verdict.predecessor, verdict.evidence)
            else:
                self.checker.book.disputed(verdict.node_ids, verdict.evidence)
            await self._drop_shadow()
            await self.chain.route_around(set(verdict.node_ids), verdict.evidence)

    async def close(self) -> None:
        if self._passed:
            self.checker.book.passed(self._passed)
        await self._drop_shadow()
        await self.chain.close()

    async def _drop_shadow(self) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is not None:
            await shadow.close()

    async def _check(self) -> Verdict | None:
        step = self.chain.last_step
        if step is None:
            return None
        if step.start_position == 0:  # a new session, or a new route replaying it
            self._history = []
            await self._drop_shadow()
        # a multi-token step may start below what was sent before: rejected draft tokens are dropped
        self._history = [*_first_positions(self._history, step.start_position), step.hidden]
        feed, start = step.hidden, step.start_position
        if self._shadow is None:
            self._shadow = await self._open_shadow(step.session_id)
            if self._shadow is None:
                return None
            feed, start = torch.cat(self._history, dim=1), 0  # a shadow opened late catches up
        try:
            return await self._compare(self._shadow, step, feed, start)
        except CoopError as exc:  # a replica failed: this step goes unchecked, the next on a new shadow
            log.info("spot check of session %s incomplete: %s", step.session_id, exc)
            await self._drop_shadow()
            return None

    async def _open_shadow(self, session_id: str) -> _Shadow | None:
        hops = list(self.chain.hops)
        replicas: list[RemoteChain] = []
        for hop in hops:
            replica = await self.checker.replica(
                hop, {h.node_id for h in hops}, self.chain.max_length, self._replica_charge
            )
            if replica is None:
                log.info("no replica of blocks %d:%d to check session %s", hop.start, hop.end, session_id)
                for opened in replicas:
                    await opened.close()
                return None
            replicas.append(replica)
        return _Shadow(session_id, hops, replicas)

    async def _compare(self, shadow: _Shadow, step: SentStep, feed: torch.Tensor, start: int) -> Verdict | None:
        """Check the step's sketches; `feed` (from position `start`) is what the shadow's first replica
        must run: the step's input, or all of the session's so far for a shadow opened late."""
        hops, seed, dims = shadow.hops, self.chain.sketch_seed, self.chain.sketch_dims
        n = step.hidden.shape[1]
        where = f"session {step.session_id} step {self._steps}"
        try:
            claims = sketches_from_proto(step.sketches, n, dims)
        except InvalidTensor as exc:
            return Verdict(tuple(h.node_id for h in hops), False, f"{where}: a malformed sketch: {exc}")
        if [c[0] for c in claims] != [h.node_id for h in hops]:
            return Verdict(tuple(h.node_id for h in hops), False, f"{where}: sketches missing or out of order")
        sent = sketch(step.hidden, seed, dims)
        if relative_distance(claims[0][1], sent, sent) > SAME_TENSOR_TOLERANCE:
            return Verdict((hops[0].node_id,), True, f"{where} hop 0 ({hops[0].node_id}): lied about its input")
        received = sketch(step.output, seed, dims)
        if relative_distance(claims[-1][2], received, received) > SAME_TENSOR_TOLERANCE:
            last = hops[-1].node_id
            return Verdict((last,), True, f"{where} hop {len(hops) - 1} ({last}): lied about its output")
        for k in range(len(hops) - 1):
            pushed, got = claims[k][2], claims[k + 1][1]
            if relative_distance(got, pushed, pushed) > SAME_TENSOR_TOLERANCE:
                pair = (hops[k].node_id, hops[k + 1].node_id)
                return Verdict(pair, False, f"{where}: hop {k} says it pushed what hop {k + 1} says it did not get")
        hidden = feed
        for k, (hop, replica) in enumerate(zip(hops, shadow.replicas, strict=True)):
            shadow.inputs[k] = [*_first_positions(shadow.inputs[k], start), hidden]
            output = await replica.step(hidden, start, [])
            # The last hop's output is here whole: compare it whole, not only in the projections it knows.
            view = _whole if k == len(hops) - 1 else partial(sketch, seed=seed, dims=dims)
            claimed = view(step.output) if k == len(hops) - 1 else claims[k][2]
            recomputed = view(output[:, -n:])
            distance = relative_distance(claimed, recomputed, recomputed - view(hidden[:, -n:]))
            if distance > self.checker.book.policy.tolerance:
                evidence = f"{where} hop {k} ({hop.node_id}, blocks {hop.start}:{hop.end}): distance {distance:.3g}"
                return await self._settle(shadow, k, claimed, recomputed, view, evidence)
            hidden = output
        self._passed.update(h.node_id for h in hops)
        return None

    async def _settle(
        self,
        shadow: _Shadow,
        k: int,
        claimed: torch.Tensor,
        recomputed: torch.Tensor,
        view: Callable[[torch.Tensor], torch.Tensor],
        evidence: str,
    ) -> Verdict:
        """A third replica re-runs hop k's whole input so far: the one it agrees with is right.
        `claimed` and `recomputed` are `view`s of hop k's and the shadow's output for this step."""
        hop = shadow.hops[k]
        shadow_nodes = tuple(h.node_id for h in shadow.replicas[k].hops)
        history = torch.cat(shadow.inputs[k], dim=1)
        n = recomputed.shape[0]
        avoid = {h.node_id for h in shadow.hops} | set(shadow_nodes)
        referee = await self.checker.replica(hop, avoid, self.chain.max_length, self._replica_charge)
        shadow_name = "+".join(shadow_nodes)
        if referee is None:
            return Verdict((hop.node_id,), False, f"{evidence}; no third replica to settle it against {shadow_name}")
        try:
            judged = (await referee.step(history, 0, []))[:, -n:]
        finally:
            await referee.close()
        tolerance = self.checker.book.policy.tolerance
        truth = view(judged)
        added = truth - view(history[:, -n:])
        evidence = f"{evidence}; third replica {'+'.join(h.node_id for h in referee.hops)}"
        route_wrong = relative_distance(claimed, truth, added) > tolerance
        shadow_wrong = relative_distance(recomputed, truth, added) > tolerance
        if route_wrong and not shadow_wrong:
            predecessor = shadow.hops[k - 1].node_id if k > 0 else ""
            return Verdict((hop.node_id,), True, f"{evidence} agrees with replica {shadow_name}", predecessor)
        if shadow_wrong and not route_wrong:
            await self._drop_shadow()
            blamed = f"{evidence} agrees with {hop.node_id}, not with replica {shadow_name}"
            if len(shadow_nodes) == 1:
                self.checker.book.quarantine(shadow_nodes[0], blamed)
            else:  # which of the replica route's hops is wrong, nobody checked
                self.checker.book.disputed(shadow_nodes, blamed)
            return Verdict((), True, evidence)  # nothing to route around: the route was right
        return Verdict((hop.node_id, *shadow_nodes), False, f"{evidence} agrees with neither")


def _first_positions(parts: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The hidden states of positions 0..length-1 out of `parts` ([1, n, h] each, in position order)."""
    if sum(part.shape[1] for part in parts) <= length:
        return parts
    return [torch.cat(parts, dim=1)[:, :length]] if length else []
