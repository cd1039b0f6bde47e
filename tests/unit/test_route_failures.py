"""What a session holds against the nodes it tried: a report is a claim, a refusal is no failure."""

from __future__ import annotations

from coop.errors import InFlightLimitExceeded, InvalidTensor, NodeDraining, PeerCacheLimitExceeded
from coop.pipeline.route_failures import HopsFailed, SessionAvoidance, is_capacity_refusal
from coop.swarm.routing import Hop

REPORTER = Hop("head", "127.0.0.1:1", 0, 2, "mallory")
TAIL = Hop("tail", "127.0.0.1:2", 2, 4, "uni b")


def test_capacity_refusals_are_no_failures() -> None:
    for refusal in (NodeDraining("draining"), PeerCacheLimitExceeded("coord", 2, 1, 2), InFlightLimitExceeded("busy")):
        assert is_capacity_refusal(refusal)
    assert not is_capacity_refusal(InvalidTensor("nan")) and not is_capacity_refusal(None)
    assert not HopsFailed("refused", refused={REPORTER.key}).counts
    assert HopsFailed("gone", dead={TAIL.key}).counts


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
