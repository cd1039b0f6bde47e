"""The sketch seed's weak spot, closed: a change hidden in the null space of the projection.

A route's first hop knows the session's sketch seed and pushes O + v, with v chosen so that the
projection it expects does not see it. With one projection per session (the old scheme, which
`one_projection_per_session` brings back) its own check passes and the next hop, whose output the
change spoils, is convicted instead. With projections drawn from the digest of the pushed bytes, v
changes the projection it was meant to hide from: the cheater is convicted and the next hop is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
import torch

from coop.config import CoordinatorSettings
from coop.coordinator.spot_checks.checked_chain import CheckedChain
from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.coordinator.spot_checks.trust_book import TrustBook
from coop.coordinator.spot_checks.withholding import WithholdingMeter
from coop.pipeline.charge import Charge
from coop.pipeline.remote import SentStep
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from coop.wire import sketches
from coop.wire.generated import coop_pb2 as pb
from coop.wire.sketches import digest, projection, sketch, sketch_to_proto
from coop.wire.tensors import tensor_from_proto, tensor_to_proto

HIDDEN, BLOCKS, SEED, TOKENS = 96, 6, 12345, 3
CHECK_ALL = CoordinatorSettings(model_dir=Path("."), spot_check_rate=1.0, spot_check_new_node_rate=1.0)
POLICY = SpotCheckPolicy.from_settings(CHECK_ALL)
ROUTE = [Hop("cheater", "a:1", 0, 3, "Mallory"), Hop("next", "b:1", 3, BLOCKS, "Bob")]
WEIGHTS = [torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(b)) / HIDDEN**0.5 for b in range(BLOCKS)]


def run_blocks(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The honest computation of blocks [start, end): a residual stream, per token."""
    for block in range(start, end):
        hidden = hidden + torch.tanh(hidden @ WEIGHTS[block])
    return hidden


def hidden_change(pushed: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """What the attacker adds to its honest output `pushed`: 20% of what its blocks added, in the
    null space of the projection it expects its output's sketch to be made with."""
    expected = projection(SEED, sketches.digest(tensor_to_proto(pushed)), HIDDEN, POLICY.sketch_dims).double()
    change = torch.randn(pushed.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    change = change - change @ expected @ torch.linalg.pinv(expected)
    added = (pushed - received).double().norm(dim=-1, keepdim=True)
    return (change / change.norm(dim=-1, keepdim=True) * added * 0.2).float()


class FakeReplica:
    """A replica route over one hop's blocks: honest."""

    def __init__(self, start: int, end: int, institution: str) -> None:
        self.hops = [Hop(f"replica-{institution}", f"{institution}:1", start, end, institution)]

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        return run_blocks(hidden, self.hops[0].start, self.hops[0].end)

    async def close(self) -> None:
        pass


class FakeChecker:
    def __init__(self) -> None:
        self.book = TrustBook(POLICY)

    async def replica(self, hop: Hop, avoid: set[str], max_length: int, charge: Charge) -> FakeReplica:
        institution = next(i for i in ("Carol", "Dave", "Erin") if i not in avoid)
        return FakeReplica(hop.start, hop.end, institution)


class CheatedRoute:
    """A route whose first hop cheats on its first step, with sketches made by the node's own code
    from what each hop received and pushed: it hides a change from its projection, or `misreports`
    its output: the digest of other bytes, or the sketch of its honest output in the projection of
    what it pushed."""

    def __init__(self, misreport: str = "") -> None:
        self.misreport = misreport
        self.hops = list(ROUTE)
        self.sketch_seed, self.sketch_dims = SEED, POLICY.sketch_dims
        self.max_length, self.failovers, self.draft_tokens = 64, 0, 0
        self.last_step: SentStep | None = None
        self.routed_around: list[set[str]] = []

    async def step(self, hidden: torch.Tensor, start_position: int, token_ids: Sequence[int]) -> torch.Tensor:
        received, made = tensor_to_proto(hidden), []
        for k, hop in enumerate(self.hops):
            output = run_blocks(tensor_from_proto(received), hop.start, hop.end)
            cheating, honest = k == 0 and not self.routed_around, output
            if cheating:
                output = output + hidden_change(output, tensor_from_proto(received))
            pushed = tensor_to_proto(output)
            made.append(sketch_to_proto(hop.node_id, received, pushed, SEED, self.sketch_dims))
            if cheating and self.misreport == "digest":
                made[0].output_digest = digest(pb.Tensor(data=b"other bytes", dtype="float32", shape=[1]))
            if cheating and self.misreport == "sketch":
                made[0].output.CopyFrom(tensor_to_proto(sketch(honest, SEED, self.sketch_dims, digest(pushed))))
            received = pushed
        result = tensor_from_proto(received)
        self.last_step = SentStep("s1", hidden, start_position, result, made)
        return result

    async def route_around(self, nodes: Collection[NodeKey], evidence: str, *, convicted: bool) -> None:
        self.routed_around.append({node.node_id for node in nodes})

    async def close(self) -> None:
        pass


def check_one_step(route: CheatedRoute) -> TrustBook:
    checker = FakeChecker()
    chain = CheckedChain(route, checker, WithholdingMeter(None), Charge())  # type: ignore[arg-type]
    hidden = torch.randn(1, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))

    async def scenario() -> None:
        await chain.step(hidden, 0, [])
        await chain.close()

    asyncio.run(scenario())
    return checker.book


@pytest.fixture
def one_projection_per_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old scheme: every sketch of the session drawn from the seed alone."""
    monkeypatch.setattr(sketches, "digest", lambda tensor: bytes(sketches.DIGEST_BYTES))
    monkeypatch.setattr("coop.coordinator.spot_checks.checked_chain.digest", sketches.digest)


def test_the_change_hides_from_the_projection_it_was_made_for() -> None:
    honest = run_blocks(torch.randn(1, TOKENS, HIDDEN), 0, 3)
    pushed_digest = digest(tensor_to_proto(honest))
    change = hidden_change(honest, torch.zeros_like(honest))
    seen = sketch(change, SEED, POLICY.sketch_dims, pushed_digest).norm(dim=-1)
    assert float((seen / change[0].norm(dim=-1)).max()) < 1e-5
    moved = sketch(change, SEED, POLICY.sketch_dims, digest(tensor_to_proto(honest + change)))
    assert float((moved.norm(dim=-1) / change[0].norm(dim=-1)).min()) > 0.3


@pytest.mark.usefixtures("one_projection_per_session")
def test_with_one_projection_per_session_the_next_hop_takes_the_blame() -> None:
    route = CheatedRoute()
    book = check_one_step(route)
    assert route.routed_around == [{"next"}]
    assert book.record(NodeKey("Bob", "next")).failed == 1
    assert book.record(NodeKey("Mallory", "cheater")).failed == 0


def test_with_projections_bound_to_the_bytes_the_cheater_is_convicted() -> None:
    route = CheatedRoute()
    book = check_one_step(route)
    assert route.routed_around == [{"cheater"}]
    cheater, following = book.record(NodeKey("Mallory", "cheater")), book.record(NodeKey("Bob", "next"))
    assert cheater.failed == 1 and cheater.quarantined  # its input was the coordinator's: no one framed it
    assert following.failed == 0 and following.disputed == 0 and not following.quarantined
    assert following.passed == 1  # the step replayed on the honest route passed


@pytest.mark.parametrize("misreport", ["digest", "sketch"])
def test_an_output_the_next_hop_did_not_get_is_a_dispute(misreport: str) -> None:
    """Nobody but the two saw the push: they lose the session's pay, neither is convicted."""
    route = CheatedRoute(misreport)
    book = check_one_step(route)
    assert route.routed_around == [{"cheater", "next"}]
    for node in (NodeKey("Mallory", "cheater"), NodeKey("Bob", "next")):
        assert book.record(node).disputed == 1 and book.record(node).failed == 0
