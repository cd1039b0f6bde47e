"""Fair share as pure logic: the factor, decay, admission order, and the node's step order."""

from __future__ import annotations

import asyncio

import pytest

from coop.coordinator.accounts.fair_share_admission import FairShareAdmission, RequestAdmission
from coop.errors import CreditExhausted
from coop.ledger.fairshare import DecayedTotals, FairShare, fair_share_factor, fair_share_factors
from coop.ledger.models import FLOPS_PER_CREDIT
from tests.waiting import wait_for_async

HOUR = 3600.0


def test_factor_is_one_unused_one_half_at_par_and_falls_beyond() -> None:
    assert fair_share_factor(0.0, 0.5) == 1.0
    assert fair_share_factor(0.5, 0.5) == 0.5
    assert fair_share_factor(0.9, 0.3) == pytest.approx(0.125)
    assert fair_share_factor(0.1, 0.0) < 1e-9  # took without giving


def test_factors_compare_usage_share_with_contribution_share() -> None:
    factors = fair_share_factors(usage={"a": 2.0, "b": 1.0}, contribution={"a": 2.0, "b": 1.0})
    assert factors["a"] == pytest.approx(factors["b"])  # each used exactly its share
    factors = fair_share_factors(usage={"a": 1.0, "b": 1.0}, contribution={"a": 2.0, "b": 1.0})
    assert factors["a"] > factors["b"]
    assert fair_share_factors(usage={}, contribution={"a": 1.0}) == {"a": 1.0}


def test_decay_halves_per_half_life_and_survives_long_gaps() -> None:
    totals = DecayedTotals(half_life_s=HOUR)
    totals.add("a", 8.0, at_s=0.0)
    assert totals.snapshot(HOUR)["a"] == pytest.approx(4.0)
    assert totals.snapshot(3 * HOUR)["a"] == pytest.approx(1.0)
    totals.add("b", 1.0, at_s=10_000 * HOUR)  # far beyond float range of 2**t without rebasing
    snapshot = totals.snapshot(10_000 * HOUR)
    assert snapshot["b"] == pytest.approx(1.0) and snapshot["a"] == 0.0
    assert totals.snapshot(10**9 * HOUR) == {"a": 0.0, "b": 0.0}


def test_usage_decays_back_to_priority() -> None:
    share = FairShare(half_life_s=HOUR)
    share.record("a", "a", 1.0, at_s=0.0)
    share.record("b", "b", 1.0, at_s=0.0)
    share.record(None, "b", 9.0, at_s=0.0)  # b used a lot more than it gave
    early = share.factor("b", now_s=0.0)
    share.record("b", "a", 1.0, at_s=20 * HOUR)  # long after, a little new activity
    assert share.factor("b", now_s=20 * HOUR) > early
    assert share.factor("nobody", now_s=0.0) == 1.0


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_idle_pool_admits_anyone_at_once_and_a_saturated_one_in_factor_order() -> None:
    factors = {"low": 0.1, "mid": 0.5, "high": 0.9}
    admission = FairShareAdmission(1, lambda: factors)
    order: list[str] = []

    async def request(name: str, hold: asyncio.Event | None = None) -> float:
        async with admission.admit(name) as waited_s:
            order.append(name)
            if hold is not None:
                await hold.wait()
            return waited_s

    async def scenario() -> float:
        waited_low = await request("low")  # idle: even the lowest priority starts at once
        hold = asyncio.Event()
        first = asyncio.create_task(request("mid", hold))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(request(name)) for name in ("low", "mid", "high")]
        await wait_for_async("three requests in line", lambda: admission.waiting == 3, timeout_s=5)
        hold.set()
        await asyncio.gather(first, *waiters)
        return waited_low

    assert _run(scenario()) == 0.0
    assert order == ["low", "mid", "high", "mid", "low"]
    assert admission.admitted_at_once == {"low": 1, "mid": 1}
    assert admission.active == 0


def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    admission = FairShareAdmission(1, dict)

    async def scenario() -> None:
        hold = asyncio.Event()

        async def holder() -> None:
            async with admission.admit("a"):
                await hold.wait()

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter.cancel()
        hold.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with admission.admit("b") as waited_s:
            assert waited_s == 0.0

    _run(scenario())
    assert admission.active == 0 and admission.waiting == 0


def test_credit_floor_refuses_with_a_clear_message() -> None:
    state = {"poor": (-5 * FLOPS_PER_CREDIT, -2 * FLOPS_PER_CREDIT), "rich": (3 * FLOPS_PER_CREDIT, 0)}
    access = RequestAdmission(FairShareAdmission(4, dict), default_consumer="coord", credit_state=state.get)

    async def enter(name: str) -> None:
        async with access.enter(name):
            pass

    with pytest.raises(CreditExhausted, match="-5 credits, below its credit floor of -2"):
        _run(enter("poor"))
    _run(enter("rich"))
    assert access.consumer(None) == "coord" and access.consumer("x") == "x"


def test_a_waiter_cancelled_just_before_its_turn_does_not_leak_the_slot() -> None:
    admission = FairShareAdmission(1, dict)

    async def scenario() -> None:
        holding = admission.admit("a")
        await holding.__aenter__()

        async def wait_in_line() -> None:
            async with admission.admit("b"):
                pass

        waiter = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0)
        waiter.cancel()  # its future is cancelled at once, before the task sees it
        await holding.__aexit__(None, None, None)  # the slot must not be handed to the cancelled waiter
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with admission.admit("c") as waited_s:
            assert waited_s == 0.0

    _run(scenario())
    assert admission.active == 0 and admission.waiting == 0
