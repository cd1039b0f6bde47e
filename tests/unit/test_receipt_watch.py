"""The receipt collector's bookkeeping: backoff of nodes that send junk, audit events per node and interval."""

from __future__ import annotations

from coop.coordinator.accounts.receipt_polling import PollOutcome, PollSchedule, RejectionDigest
from coop.swarm.node_key import NodeKey

INTERVAL_S = 60.0
CAP = 8
JUNK = PollOutcome(booked=1, rejected=150, dropped=49)
CLEAN = PollOutcome(booked=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def polled_rounds(schedule: PollSchedule, node: str, rounds: int, outcome: PollOutcome) -> list[int]:
    """The rounds (0-based) in which `node` was polled, each poll ending with `outcome`."""
    polled = []
    for round_ in range(rounds):
        if node in schedule.due([node, "honest"]):
            polled.append(round_)
            schedule.polled(node, outcome)
        schedule.polled("honest", CLEAN)
    return polled


def test_a_node_that_sends_junk_is_polled_ever_less_often_up_to_a_cap() -> None:
    schedule = PollSchedule(max_backoff_rounds=CAP)

    polled = polled_rounds(schedule, "flood", 40, JUNK)

    # skipped 1, 2, 4, 8, then 8 rounds after each poll
    assert polled == [0, 2, 5, 10, 19, 28, 37]
    tally = schedule.tallies["flood"]
    assert (tally.polls, tally.backoff_rounds, tally.skipped) == (7, CAP, 33)
    assert (tally.rejected, tally.dropped, tally.booked) == (7 * 150, 7 * 49, 7)
    honest = schedule.tallies["honest"]
    assert (honest.polls, honest.skipped, honest.backoff_rounds) == (40, 0, 0)


def test_a_poll_that_runs_out_of_time_backs_off_and_a_clean_one_clears_it() -> None:
    schedule = PollSchedule(max_backoff_rounds=CAP)
    assert schedule.due(["slow"]) == ["slow"]
    schedule.polled("slow", PollOutcome(timed_out=True))
    assert schedule.due(["slow"]) == []
    assert schedule.due(["slow"]) == ["slow"]
    schedule.polled("slow", PollOutcome(failed=True))  # unreachable: neither worse nor better
    assert schedule.tallies["slow"].backoff_rounds == 1
    assert schedule.due(["slow"]) == []
    assert schedule.due(["slow"]) == ["slow"]
    schedule.polled("slow", CLEAN)
    assert schedule.due(["slow"]) == ["slow"]
    tally = schedule.tallies["slow"]
    assert (tally.timeouts, tally.errors, tally.backoff_rounds, tally.booked) == (1, 1, 0, 3)


def test_a_node_long_gone_is_forgotten_but_not_one_that_blinked() -> None:
    clock = Clock()
    schedule = PollSchedule(max_backoff_rounds=CAP, forget_after_s=600, clock=clock)
    schedule.due(["a", "b"])
    schedule.polled("a", JUNK)
    clock.now += 300
    schedule.due(["b"])
    assert set(schedule.snapshot()) == {"a", "b"}
    assert schedule.due(["a", "b"]) == ["b"]  # a is still backed off
    clock.now += 601
    schedule.due(["b"])
    assert set(schedule.snapshot()) == {"b"}


N1, N2 = NodeKey("Uni 1", "n1"), NodeKey("Uni 2", "n2")


def test_rejections_become_one_audit_event_per_node_per_interval() -> None:
    clock = Clock()
    digest = RejectionDigest("coordinator:coord", INTERVAL_S, clock)
    digest.add(N1, "r1", "receipt r1: the signature does not match")
    digest.add(N2, "r9", "receipt r9 claims 5 FLOPs")
    [first, second] = digest.due()
    assert (first.action, first.subject, first.detail) == (
        "receipt_rejected",
        "r1",
        "node n1: receipt r1: the signature does not match",
    )
    assert second.subject == "r9"

    for index in range(1000):
        digest.add(N1, f"x{index}", f"receipt x{index} is signed for node 'ghost': dropped", dropped=index % 2 == 0)
    digest.add(N1, "", "sent 5000 receipts when asked for 200", dropped=True, count=4800)
    clock.now += INTERVAL_S - 1
    assert digest.due() == []
    clock.now += 1
    [gathered] = digest.due()
    assert (gathered.action, gathered.subject) == ("receipts_rejected", "n1")
    assert "500 receipts rejected and 5300 dropped" in gathered.detail
    assert "the first 10: x0: receipt x0 is signed for node 'ghost': dropped; x1: " in gathered.detail
    assert "x9: " in gathered.detail and "x10" not in gathered.detail
    assert (digest.written, digest.suppressed) == (3, 5800 - 1)
    assert digest.due() == []

    minted = [NodeKey("Uni 1", f"minted-{i}") for i in range(8)]  # more node ids: no more audit events
    for node in minted:
        digest.add(node, f"y-{node.node_id}", "forged")
    assert digest.due() == []
    clock.now += INTERVAL_S
    [member] = digest.due()
    assert "8 receipts rejected" in member.detail and "minted-7" in member.detail
    assert (digest.written, digest.suppressed) == (4, 5800 - 1 + 8 - 1)

    clock.now += INTERVAL_S  # quiet for an interval: the next rejection is written at once again
    digest.add(N1, "r2", "late")
    assert [e.subject for e in digest.due()] == ["r2"]
    digest.add(N1, "r3", "later")
    assert digest.due() == [] and [e.subject for e in digest.drain()] == ["r3"]
