"""A chain whose sampled sessions are re-computed on replicas step by step before each token is released."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from coop.coordinator.spot_checks.replicas import SpotChecker
from coop.coordinator.spot_checks.withholding import WithholdingMeter
from coop.errors import CoopError, InvalidTensor
from coop.pipeline.charge import Charge
from coop.pipeline.remote import RemoteChain, SentStep
from coop.swarm.node_key import NodeKey, key_of
from coop.swarm.routing import Hop
from coop.wire.sketches import HopSketch, digest, relative_distance, sketch, sketches_from_proto
from coop.wire.tensors import tensor_to_proto

log = logging.getLogger(__name__)

# An honest hop's sketches of the tensor it passes on equal its neighbour's, up to the float rounding
# of a projection computed on another device.
SAME_TENSOR_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Verdict:
    """Nodes to route around, and whether the fault is proven (quarantine) or disputed.

    An `unsettled` dispute (no institution independent of both sides to referee it) is a verdict
    against no one: audited, but nobody is routed around or loses pay, and the session goes on
    unchecked, so that a member with no independent referee in the pool cannot even cost another
    member its session.
    """

    nodes: tuple[NodeKey, ...]
    proven: bool
    evidence: str
    # the institution of the node that pushed the culprit its input ("": the coordinator did, or it
    # lied about its own ends)
    predecessor: str = ""
    unsettled: bool = False


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

    def __init__(self, chain: RemoteChain, checker: SpotChecker, meter: WithholdingMeter, charge: Charge) -> None:
        """`meter`: the chain's, which withholds the culprits' pay; `charge`: the session's own, which
        pays the replicas for the check like for any session."""
        self.chain = chain
        self.checker = checker
        self._meter = meter
        self._replica_charge = charge
        self._sampled = False
        self._charged: tuple[str, ...] | None = None  # decided at the first step: institutions the check is charged to
        self._shadow: _Shadow | None = None
        self._history: list[torch.Tensor] = []  # what the route's first hop got so far: a new shadow's catch-up
        self._passed: Counter[NodeKey] = Counter()  # checked steps per node that passed, in this session
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
        if self._charged is None:
            charged = self.checker.book.sampled(self.chain.hops)
            self._sampled, self._charged = charged is not None, charged or ()
        while True:
            output = await self.chain.step(hidden, start_position, token_ids)
            if not self._sampled:
                return output
            self._steps += 1
            verdict = await self._check()
            if verdict is None or not verdict.nodes:
                return output
            if verdict.unsettled:
                self.checker.book.disputed(verdict.nodes, verdict.evidence)
                self._sampled = False
                await self._drop_shadow()
                return output
            self._meter.withheld.update(verdict.nodes)
            if verdict.proven:
                for node in verdict.nodes:
                    self.checker.book.convict(node, verdict.predecessor, verdict.evidence)
            else:
                self.checker.book.disputed(verdict.nodes, verdict.evidence)
            await self._drop_shadow()
            await self.chain.route_around(verdict.nodes, verdict.evidence, convicted=verdict.proven)

    async def close(self) -> None:
        if self._passed:
            self.checker.book.passed(self._passed)
        if self._charged:
            self.checker.book.check_ended(self._charged)
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
            # Outside the checked hop's own institution (a check by itself proves nothing); another hop's
            # institution may replicate it: a false replica only starts a dispute, settled by a referee
            # of neither side, so a route of two institutions is checked like a route of one.
            avoid = {hop.institution}
            replica = await self.checker.replica(hop, avoid, self.chain.max_length, self._replica_charge)
            if replica is None:
                log.info(
                    "no replica of blocks %d:%d outside %s to check session %s",
                    hop.start,
                    hop.end,
                    hop.institution,
                    session_id,
                )
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
        keys = tuple(key_of(h) for h in hops)
        try:
            claims = sketches_from_proto(step.sketches, n, dims)
        except InvalidTensor as exc:
            return Verdict(keys, False, f"{where}: a malformed sketch: {exc}")
        if [c.node_id for c in claims] != [h.node_id for h in hops]:
            return Verdict(keys, False, f"{where}: sketches missing or out of order")
        if verdict := _unchained(claims, step, seed, dims, keys, where):
            return verdict
        hidden = feed
        for k, (hop, replica) in enumerate(zip(hops, shadow.replicas, strict=True)):
            shadow.inputs[k] = [*_first_positions(shadow.inputs[k], start), hidden]
            output = await replica.step(hidden, start, [])
            # The last hop's output is here whole: compare it whole. Any other hop's, in the projection
            # drawn from the digest of the bytes it pushed, which it could not know before it chose them.
            last = k == len(hops) - 1
            view = _whole if last else partial(sketch, seed=seed, dims=dims, tensor_digest=claims[k].output_digest)
            claimed = view(step.output) if last else claims[k].output
            recomputed = view(output[:, -n:])
            distance = relative_distance(claimed, recomputed, recomputed - view(hidden[:, -n:]))
            if distance > self.checker.book.policy.tolerance:
                evidence = f"{where} hop {k} ({key_of(hop)}, blocks {hop.start}:{hop.end}): distance {distance:.3g}"
                return await self._settle(shadow, k, claimed, recomputed, view, evidence)
            hidden = output
        self._passed.update(keys)
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
        """A third replica, of an institution other than hop k's and the shadow's, re-runs hop k's whole
        input so far: the one it agrees with is right. `claimed` and `recomputed` are `view`s of hop k's
        and the shadow's output for this step."""
        hop = key_of(shadow.hops[k])
        shadow_nodes = tuple(key_of(h) for h in shadow.replicas[k].hops)
        history = torch.cat(shadow.inputs[k], dim=1)
        n = recomputed.shape[0]
        avoid = {hop.institution} | {node.institution for node in shadow_nodes}
        referee = await self.checker.replica(shadow.hops[k], avoid, self.chain.max_length, self._replica_charge)
        shadow_name = "+".join(map(str, shadow_nodes))
        if referee is None:
            unsettled = f"{evidence}; no institution independent of both to settle it against {shadow_name}"
            return Verdict((hop, *shadow_nodes), False, unsettled, unsettled=True)
        try:
            judged = (await referee.step(history, 0, []))[:, -n:]
        finally:
            await referee.close()
        tolerance = self.checker.book.policy.tolerance
        truth = view(judged)
        added = truth - view(history[:, -n:])
        evidence = f"{evidence}; third replica {'+'.join(str(key_of(h)) for h in referee.hops)}"
        route_wrong = relative_distance(claimed, truth, added) > tolerance
        shadow_wrong = relative_distance(recomputed, truth, added) > tolerance
        if route_wrong and not shadow_wrong:
            predecessor = shadow.hops[k - 1].institution if k > 0 else ""
            return Verdict((hop,), True, f"{evidence} agrees with replica {shadow_name}", predecessor)
        if shadow_wrong and not route_wrong:
            await self._drop_shadow()
            blamed = f"{evidence} agrees with {hop}, not with replica {shadow_name}"
            if len(shadow_nodes) == 1:
                self.checker.book.quarantine(shadow_nodes[0], blamed)
            else:  # which of the replica route's hops is wrong, nobody checked
                self.checker.book.disputed(shadow_nodes, blamed)
            return Verdict((), True, evidence)  # nothing to route around: the route was right
        return Verdict((hop, *shadow_nodes), False, f"{evidence} agrees with neither")


def _unchained(
    claims: list[HopSketch], step: SentStep, seed: int, dims: int, keys: tuple[NodeKey, ...], where: str
) -> Verdict | None:
    """A verdict if the hops' sketches do not chain: hop 0's input must be what the coordinator sent,
    each hop's output what the next hop received, and the last hop's what came back; in digests and
    in sketches."""
    if _differ(claims[0].input_digest, claims[0].input, step.hidden, seed, dims):
        return Verdict(keys[:1], True, f"{where} hop 0 ({keys[0]}): lied about its input")
    if _differ(claims[-1].output_digest, claims[-1].output, step.output, seed, dims):
        return Verdict(keys[-1:], True, f"{where} hop {len(keys) - 1} ({keys[-1]}): lied about its output")
    for k in range(len(claims) - 1):
        pushed, got = claims[k], claims[k + 1]
        if pushed.output_digest != got.input_digest or (
            relative_distance(got.input, pushed.output, pushed.output) > SAME_TENSOR_TOLERANCE
        ):
            return Verdict(
                keys[k : k + 2], False, f"{where}: hop {k} says it pushed what hop {k + 1} says it did not get"
            )
    return None


def _differ(claimed_digest: bytes, claimed: torch.Tensor, actual: torch.Tensor, seed: int, dims: int) -> bool:
    """Whether a hop's digest and sketch of a tensor the coordinator sent or got are not those of
    `actual`: re-encoding it gives the very bytes that went over the wire."""
    actual_digest = digest(tensor_to_proto(actual))
    if claimed_digest != actual_digest:
        return True
    computed = sketch(actual, seed, dims, actual_digest)
    return relative_distance(claimed, computed, computed) > SAME_TENSOR_TOLERANCE


def _first_positions(parts: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The hidden states of positions 0..length-1 out of `parts` ([1, n, h] each, in position order)."""
    if sum(part.shape[1] for part in parts) <= length:
        return parts
    return [torch.cat(parts, dim=1)[:, :length]] if length else []
