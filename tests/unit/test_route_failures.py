"""What a session holds against the nodes it tried: a report is a claim, a refusal is no failure, a
conviction takes the culprit's institution out of the session without using up its failovers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence

import pytest
import torch

from coop.errors import (
    InFlightLimitExceeded,
    InvalidTensor,
    NodeDraining,
    PeerCacheLimitExceeded,
    PeerError,
    RouteUnavailable,
)
from coop.pipeline.remote import RemoteChain
from coop.pipeline.route_failures import HopsFailed, SessionAvoidance, is_capacity_refusal
from coop.swarm.node_key import NodeKey
from coop.swarm.routing import Hop
from tests.hostile_node import FakeSessionCall

REPORTER = Hop("head", "127.0.0.1:1", 0, 2, "mallory")
TAIL = Hop("tail", "127.0.0.1:2", 2, 4, "uni b")
BLOCKS = 4
MALLORY = [Hop(f"mallory-{i}", f"127.0.0.1:{10 + i}", 0, BLOCKS, "Mallory") for i in range(8)]
VICTIM = Hop("victim", "127.0.0.1:20", 0, BLOCKS, "Uni V")
THIRD = Hop("third", "127.0.0.1:21", 0, BLOCKS, "Uni T")


def test_capacity_refusals_are_no_failures() -> None:
    for refusal in (NodeDraining("draining"), PeerCacheLimitExceeded("coord", 2, 1, 2), InFlightLimitExceeded("busy")):
        assert is_capacity_refusal(refusal)
    assert not is_capacity_refusal(InvalidTensor("nan")) and not is_capacity_refusal(None)
    avoidance = SessionAvoidance()
    assert not avoidance.counts(HopsFailed("refused", refused={REPORTER.key}))
    assert avoidance.counts(HopsFailed("gone", dead={TAIL.key}))


def test_a_claim_against_another_institution_s_node_moves_the_session_off_the_reporter() -> None:
    avoidance = SessionAvoidance()
    failure = avoidance.claim(REPORTER, TAIL, "could not push")
    assert failure.dead == frozenset()  # the blamed node answered a probe: nobody suspects it
    assert failure.avoid == failure.refused == {REPORTER.key}
    # a second reporter of the same institution adds nothing; one of another institution corroborates
    assert avoidance.claim(Hop("head-2", "127.0.0.1:3", 0, 2, "mallory"), TAIL, "could not push").dead == frozenset()
    assert avoidance.claim(Hop("head", "127.0.0.1:4", 0, 2, "uni a"), TAIL, "could not push").dead == {TAIL.key}


def test_a_member_s_word_about_its_own_node_stands() -> None:
    own = Hop("tail", "127.0.0.1:2", 2, 4, "mallory")
    assert SessionAvoidance().claim(REPORTER, own, "could not push").dead == {own.key}


def test_an_institution_whose_nodes_refuse_twice_leaves_the_session() -> None:
    avoidance = SessionAvoidance()
    avoidance.record(HopsFailed("refused", refused={("mallory", "fake-0")}))
    assert avoidance.refusing_institutions == set()
    avoidance.record(HopsFailed("refused", refused={("mallory", "fake-1"), ("uni b", "tail")}))
    assert avoidance.refusing_institutions == {"mallory"}
    assert avoidance.excluded == set() and len(avoidance.refusing) == 3


def test_a_conviction_costs_no_failover_the_first_time_its_institution_is_convicted() -> None:
    avoidance = SessionAvoidance()
    caught = HopsFailed("caught", convicted={MALLORY[0].key})
    assert not avoidance.counts(caught)
    avoidance.record(caught)
    assert avoidance.convicted_institutions == avoidance.left_institutions == {"Mallory"}
    assert avoidance.excluded == {MALLORY[0].key}
    # only a route that ignored the session's avoidance can meet Mallory again: that conviction counts
    assert avoidance.counts(HopsFailed("caught again", convicted={MALLORY[1].key}))


class _Swarm:
    """Whole-model nodes that open every session, in order of preference, and the ChannelPool reaching
    them. `honours_institutions`: False is a route source that ignores the institutions a session left."""

    def __init__(self, hops: Sequence[Hop], *, honours_institutions: bool = True) -> None:
        self.hops = hops
        self.honours_institutions = honours_institutions
        self.revoked: Callable[[], frozenset[str]] = frozenset

    async def route(self, exclude: Collection[NodeKey] = (), avoid_institutions: Collection[str] = ()) -> list[Hop]:
        left = avoid_institutions if self.honours_institutions else ()
        for hop in self.hops:
            if hop.key not in exclude and hop.institution not in left:
                return [hop]
        raise RouteUnavailable([(0, BLOCKS)], BLOCKS)

    def stub(self, endpoint: str, institution: str = "", node_id: str = "") -> _Swarm:
        return self

    def Session(self) -> FakeSessionCall:
        return FakeSessionCall()

    def leaving(self) -> set[NodeKey]:
        return set()

    def release(self, hops: Sequence[Hop]) -> None:
        pass

    def suspect(self, key: NodeKey) -> None:
        pass

    def refused(self, key: NodeKey) -> None:
        pass

    def served(self, hops: Sequence[Hop]) -> None:
        pass

    def step_completed(self, hops: Sequence[Hop], tokens: int, seconds: float) -> None:
        pass


async def _opened_chain(swarm: _Swarm, max_failovers: int) -> RemoteChain:
    chain = RemoteChain(
        swarm,
        swarm,  # type: ignore[arg-type]
        lambda token_ids: torch.zeros(1, token_ids.shape[1], 8),
        hidden_size=8,
        dtype=torch.float32,
        max_length=16,
        max_failovers=max_failovers,
    )
    return await chain.open()


async def _route_around(chain: RemoteChain, culprit: Hop, *, convicted: bool) -> list[str]:
    await chain.route_around({culprit.key}, f"{culprit.node_id} is wrong", convicted=convicted)
    return [hop.node_id for hop in chain.hops]


def test_a_member_s_eight_node_ids_cost_a_session_one_conviction_and_no_failover() -> None:
    """Mallory's first node caught, none of its other seven is tried in the session; each conviction
    leaves the session an institution fewer, so they end when the institutions do."""

    async def convict_in_turn() -> None:
        chain = await _opened_chain(_Swarm([*MALLORY, VICTIM, THIRD]), max_failovers=0)
        assert [hop.node_id for hop in chain.hops] == ["mallory-0"]
        assert await _route_around(chain, MALLORY[0], convicted=True) == ["victim"]
        assert await _route_around(chain, VICTIM, convicted=True) == ["third"]
        assert chain.failovers == 0
        with pytest.raises(RouteUnavailable):
            await _route_around(chain, THIRD, convicted=True)

    asyncio.run(convict_in_turn())


def test_a_dispute_leaves_only_the_disputed_node_and_uses_up_a_failover() -> None:
    async def dispute_twice() -> None:
        chain = await _opened_chain(_Swarm([*MALLORY, VICTIM]), max_failovers=1)
        assert await _route_around(chain, MALLORY[0], convicted=False) == ["mallory-1"]
        assert chain.failovers == 1
        with pytest.raises(PeerError, match="giving up after 1 failovers"):
            await _route_around(chain, MALLORY[1], convicted=False)

    asyncio.run(dispute_twice())


def test_convictions_stay_bounded_by_max_failovers_if_the_route_source_ignores_the_left_institution() -> None:
    async def convict_the_same_member_again() -> None:
        chain = await _opened_chain(_Swarm([*MALLORY, VICTIM], honours_institutions=False), max_failovers=1)
        assert await _route_around(chain, MALLORY[0], convicted=True) == ["mallory-1"]
        assert await _route_around(chain, MALLORY[1], convicted=True) == ["mallory-2"]
        assert chain.failovers == 1
        with pytest.raises(PeerError, match="giving up"):
            await _route_around(chain, MALLORY[2], convicted=True)

    asyncio.run(convict_the_same_member_again())
