"""The KV-cache share decision (coop/node/cache_shares.py), with named sizes and no node."""

from __future__ import annotations

from coop.node.cache_shares import Holding, fair_share_bytes, plan_room

SESSION = 100
BUDGET = 8 * SESSION


def sessions(consumer: str, count: int, *, idle_from: float = 0.0, busy: bool = False) -> list[Holding]:
    return [Holding(f"{consumer}{i}", consumer, SESSION, None if busy else idle_from + i) for i in range(count)]


def test_free_room_goes_to_anyone_whatever_it_holds() -> None:
    plan = plan_room(BUDGET, 2 * SESSION, "A", SESSION, sessions("A", 6))
    assert (plan.evict, plan.refused) == ([], False)


def test_a_full_node_takes_idle_room_from_institutions_above_their_share_longest_idle_first() -> None:
    holdings = sessions("A", 8, idle_from=10.0)
    plan = plan_room(BUDGET, 0, "B", SESSION, holdings)
    assert plan.evict == ["A0"] and not plan.refused
    assert plan.share_bytes == BUDGET // 2


def test_an_institution_at_its_share_gets_only_free_room() -> None:
    holdings = sessions("A", 4) + sessions("B", 4)
    plan = plan_room(BUDGET, 0, "B", SESSION, holdings)
    assert plan.refused and plan.over_share and plan.evict == []


def test_sessions_with_steps_in_flight_are_never_evicted() -> None:
    plan = plan_room(BUDGET, 0, "B", SESSION, sessions("A", 8, busy=True))
    assert plan.refused and not plan.over_share


def test_no_institution_is_pushed_below_its_share() -> None:
    holdings = sessions("A", 4) + sessions("C", 3) + sessions("B", 1)
    plan = plan_room(3 * 4 * SESSION, 0, "B", 2 * SESSION, holdings)  # share: 4 sessions each
    assert plan.refused  # A is at its share, C below it: nobody idle above the share to take from
    assert fair_share_bytes(BUDGET, ["A", "B", "A"]) == BUDGET // 2
