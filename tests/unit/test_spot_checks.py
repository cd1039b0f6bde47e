"""Spot checks' parts without a network: the tolerance calibrated on real engines, replica routes, trust records.

The calibration: two replicas of the same prepared model (float32, CPU) run the same sessions, one
step at a time on one and in packed batches of concurrent sessions on the other (batching reorders
float sums: the largest honest difference a node can make). Every step's sketch distance must stay
far under the tolerance, and 1% noise must land far over it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import torch

from coop.config import CoordinatorSettings
from coop.coordinator.spot_checks.policy import SpotCheckPolicy
from coop.coordinator.spot_checks.replicas import replica_route
from coop.coordinator.spot_checks.trust_book import TrustBook
from coop.coordinator.spot_checks.withholding import WithholdingMeter
from coop.model.engine import SpanEngine, StepInput
from coop.pipeline.charge import Payer
from coop.receipts import TokenTally
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from coop.swarm.trust import DISPUTED, LIFTED, PASSED, QUARANTINED, trust_records
from coop.wire.sketches import digest, relative_distance, sketch
from coop.wire.tensors import tensor_to_proto
from tests.adversarial.cheating_node import NOISE_SHARE, tampered
from tests.announcements import node

SESSIONS = 8
DECODE_STEPS = 63  # with the prefill: 8 x 64 = 512 checked steps
SEED = 12345
POLICY = SpotCheckPolicy.from_settings(CoordinatorSettings(model_dir=Path(".")))  # the defaults


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir: str) -> tuple[SpanEngine, SpanEngine]:
    return SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu"), SpanEngine.load(tiny_llama_dir, 0, 6, device="cpu")


def test_honest_replicas_stay_under_the_tolerance_and_noise_goes_over(
    replicas: tuple[SpanEngine, SpanEngine],
) -> None:
    single, batched = replicas
    assert batched.can_batch
    dims, tolerance = POLICY.sketch_dims, POLICY.tolerance
    rng = torch.Generator().manual_seed(0)
    ids = [f"s{i}" for i in range(SESSIONS)]
    for engine in replicas:
        for session_id in ids:
            engine.open_session(session_id, max_length=128, start=0, end=6)
    inputs = {s: torch.randn(1, 5 + i, single.hidden_size, generator=rng) for i, s in enumerate(ids)}
    positions = dict.fromkeys(ids, 0)
    honest: list[float] = []
    noisy: list[float] = []
    for _ in range(DECODE_STEPS + 1):
        steps = [StepInput(s, inputs[s], positions[s]) for s in ids]
        outputs = batched.step_batch(steps)
        for step, other in zip(steps, outputs, strict=True):
            assert isinstance(other, torch.Tensor)
            output = single.step(step.session_id, step.hidden, step.start_position)
            honest.append(distance(other, output, step.hidden, dims))
            noisy.append(distance(tampered("noise", step.session_id, step.hidden, output), output, step.hidden, dims))
            positions[step.session_id] += step.hidden.shape[1]
            inputs[step.session_id] = torch.randn(1, 1, single.hidden_size, generator=rng)
    print(
        f"{len(honest)} steps: honest distance max {max(honest):.2e}; "
        f"{NOISE_SHARE:.0%} noise distance min {min(noisy):.2e}, median {sorted(noisy)[len(noisy) // 2]:.2e}; "
        f"tolerance {tolerance:g}"
    )
    assert len(honest) >= 500
    assert max(honest) < tolerance / 10
    assert min(noisy) > tolerance


def distance(claimed: torch.Tensor, recomputed: torch.Tensor, hidden: torch.Tensor, dims: int) -> float:
    """As the coordinator measures a hop that pushed `claimed`: in the projection of its bytes."""
    view = partial(sketch, seed=SEED, dims=dims, tensor_digest=digest(tensor_to_proto(claimed)))
    return relative_distance(view(claimed), view(recomputed), view(recomputed) - view(hidden))


def test_sketches_are_linear_and_drawn_from_the_seed_and_the_digest() -> None:
    a, b = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    named = digest(tensor_to_proto(a))
    one = partial(sketch, seed=SEED, dims=16, tensor_digest=named)
    assert torch.allclose(one(a + b), one(a) + one(b), atol=1e-5)
    assert not torch.allclose(sketch(a, SEED, 16, named), sketch(a, SEED + 1, 16, named))
    assert not torch.allclose(sketch(a, SEED, 16, named), sketch(a, SEED, 16, digest(tensor_to_proto(b))))


def test_a_digest_names_dtype_shape_and_bytes() -> None:
    a = torch.randn(2, 6)
    digests = {digest(tensor_to_proto(t)) for t in (a, a.reshape(3, 4), a.reshape(1, 2, 6), a.to(torch.bfloat16))}
    assert len(digests) == 4 and digest(tensor_to_proto(a.clone())) in digests


def test_replica_routes_tile_the_hop_and_avoid_its_institutions() -> None:
    nodes = [
        node("whole", 0, 6, institution="A"),
        node("head", 0, 3, institution="B"),
        node("tail", 3, 6, institution="C"),
        node("mid", 2, 5, institution="D"),
    ]
    rng = random.Random(0)
    for _ in range(50):
        route = replica_route(nodes, 1, 5, {"A"}, rng)
        assert route is not None and route[0].start == 1 and route[-1].end == 5
        assert all(a.end == b.start for a, b in itertools.pairwise(route))
        assert "whole" not in {h.node_id for h in route}
    assert replica_route(nodes, 0, 6, {"A", "B"}, rng) is None  # nobody else serves block 0


def test_a_member_never_checks_itself_however_many_node_ids_it_runs() -> None:
    """Mallory's eight node ids over the checked node's blocks are no replica of Mallory's own hop, and
    none of another's once Mallory is on the route; a quarantined node is no replica either."""
    mallory = [node(f"m{i}", 0, 6, institution="Mallory") for i in range(8)]
    honest = node("honest", 0, 6, institution="Uni")
    rng = random.Random(0)
    assert replica_route([*mallory, honest], 0, 6, {"Mallory"}, rng) == [Hop("honest", honest.endpoint, 0, 6, "Uni")]
    assert replica_route([*mallory, honest], 0, 6, {"Mallory", "Uni"}, rng) is None
    assert replica_route([honest], 0, 6, {"Mallory"}, rng, quarantined={NodeKey("Uni", "honest")}) is None
    # a quarantined id of one member does not bar another member's node of the same name
    twin = node("m0", 0, 6, institution="Uni")
    assert replica_route([twin], 0, 6, set(), rng, quarantined={NodeKey("Mallory", "m0")}) is not None


def test_a_replica_comes_from_one_institution_when_one_can_serve_it_alone() -> None:
    """Two institutions of split spans and a third: a replica spread over two would leave a pool of
    three no independent referee, so one institution's nodes make the replica whenever they can."""
    nodes = [
        node(f"{i}-{part}", a, b, institution=i) for i in ("A", "B") for part, (a, b) in enumerate([(0, 3), (3, 6)])
    ]
    for seed in range(20):
        route = replica_route(nodes, 0, 6, {"Mallory"}, random.Random(seed))
        assert route is not None and len({h.institution for h in route}) == 1, route
    mixed = [node("A-0", 0, 3, institution="A"), node("B-1", 3, 6, institution="B")]
    route = replica_route(mixed, 0, 6, {"Mallory"}, random.Random(0))
    assert route is not None and {h.institution for h in route} == {"A", "B"}  # the fallback still tiles


def test_trust_records_follow_the_audit_trail() -> None:
    events = [
        (1, PASSED, "U/a", "40"),
        (2, PASSED, "U/b", "12"),
        (3, QUARANTINED, "V/c", "session s step 2 hop 0 (c): distance 0.2"),
        (4, DISPUTED, "U/a", "hop 0 says it pushed what hop 1 says it did not get"),
        (4, DISPUTED, "U/b", "hop 0 says it pushed what hop 1 says it did not get"),
        (6, LIFTED, "V/c", "fixed"),
        (5, PASSED, "U/a", "2"),
        (7, QUARANTINED, "W/a", "another member's node named a"),
    ]
    records = trust_records(events)
    assert (records[NodeKey("U", "a")].passed, records[NodeKey("U", "a")].disputed) == (42, 1)
    assert (records[NodeKey("V", "c")].failed, records[NodeKey("V", "c")].quarantined) == (1, "")
    assert trust_records(events[:3])[NodeKey("V", "c")].quarantined.startswith("session s")
    assert records[NodeKey("W", "a")].quarantined and not records[NodeKey("U", "a")].quarantined


def test_new_nodes_are_sampled_at_the_new_node_rate() -> None:
    book = TrustBook(SpotCheckPolicy(0.02, 0.5, 10, 0.005, 32), random.Random(1))
    old, new = Hop("old", "e", 0, 3, "U"), Hop("new", "e", 3, 6, "V")
    book.record(NodeKey("U", "old")).passed = 10

    def sampled(hops: list[Hop]) -> bool:
        charged = book.sampled(hops)
        if charged is not None:
            book.check_ended(charged)
        return charged is not None

    assert 40 <= sum(sampled([old]) for _ in range(4000)) <= 130  # about 2%
    assert 1800 <= sum(sampled([old, new]) for _ in range(4000)) <= 2200  # about 50%


def test_new_node_ids_of_one_member_cause_a_bounded_number_of_checks() -> None:
    """Minting node ids buys no more verification work: past its cap of checks in flight, a member's
    new nodes are checked at the pool's rate; the cap frees as its checks end."""
    book = TrustBook(SpotCheckPolicy(0.0, 1.0, 10, 0.005, 32, new_node_checks_per_institution=2), random.Random(1))
    minted = [Hop(f"m{i}", "e", 0, 6, "Mallory") for i in range(8)]
    first, second = book.sampled([minted[0]]), book.sampled([minted[1]])
    assert first == second == ("Mallory",)
    assert all(book.sampled([hop]) is None for hop in minted)  # rate 0 beyond the cap
    assert book.sampled([Hop("fresh", "e", 0, 6, "Uni")]) == ("Uni",)  # another member's cap is its own
    book.check_ended(("Mallory",))
    assert book.sampled([minted[5]]) == ("Mallory",)


class _Observations:
    def __init__(self) -> None:
        self.sessions: list[list[str]] = []
        self.checkpoints: list[list[str]] = []

    def stepped(self, session_id: str, consumer: Payer, hops: Sequence[Hop], tokens: int, sent: TokenTally) -> None:
        self.checkpoints.append([hop.node_id for hop in hops])

    def session_ended(self, session_id: str, consumer: Payer, hops: Sequence[Hop], sent: TokenTally) -> None:
        self.sessions.append([hop.node_id for hop in hops])


def test_a_node_found_at_fault_is_not_observed_so_its_receipt_goes_unpaid() -> None:
    observed = _Observations()
    meter = WithholdingMeter(observed)
    route = [Hop("honest", "e", 0, 3, "U"), Hop("cheat", "e", 3, 6, "M")]
    uni = Payer("uni")
    meter.stepped("s1", uni, route, 1, TokenTally())
    meter.session_ended("s1", uni, route, TokenTally())
    meter.withheld.add(NodeKey("M", "cheat"))
    meter.stepped("s2", uni, route, 1, TokenTally())
    meter.session_ended("s2", uni, route, TokenTally())
    assert observed.sessions == [["honest", "cheat"], ["honest"]]
    assert observed.checkpoints == [["honest", "cheat"], ["honest"]]  # no checkpoint once caught either


def test_a_node_is_quarantined_at_once_on_the_coordinators_input_else_after_two_predecessors() -> None:
    """Predecessors count by institution: a framer's many node ids are one predecessor."""
    book = TrustBook(SpotCheckPolicy(0.02, 0.5, 10, 0.005, 32), random.Random(1))
    first, middle = NodeKey("U", "first-hop"), NodeKey("V", "middle")
    book.convict(first, "", "hop 0 distance 0.3")
    assert book.quarantined() == {first}
    book.convict(middle, "Framer", "hop 1 distance 0.3")
    book.convict(middle, "Framer", "hop 1 distance 0.2")
    assert middle not in book.quarantined() and book.record(middle).failed == 2
    book.convict(middle, "Another", "hop 1 distance 0.3")
    assert middle in book.quarantined()
