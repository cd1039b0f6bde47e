"""Receipts per batch: each batch of a (session, node) is booked once, and all of them together are paid
at most what the coordinator observed; a live session's receipts wait for its observation to rise."""

from __future__ import annotations

import pytest

from coop.errors import ReceiptPending, ReceiptRejected
from coop.ledger.models import Observation
from coop.ledger.queries import BookedBatch
from coop.ledger.store import Booking, Ledger
from coop.ledger.verify import PoolTrust, verify_ledger
from coop.receipts import SignedReceipt
from tests.ledger.conftest import COORDINATOR, Receipts, span_flops_per_token

BLOCKS = (0, 10)


def _batch(receipts: Receipts, seen: Observation, batch: int, prefill: int, decode: int) -> SignedReceipt:
    return receipts.sign(receipts.body(seen, batch=batch, prefill_tokens=prefill, decode_tokens=decode))


def _booked(booking: Booking) -> BookedBatch:
    return BookedBatch(booking.body.receipt_id, booking.payment.prefill_tokens, booking.payment.decode_tokens)


def test_batches_sum_to_the_work_each_is_booked_once_and_verify_passes(receipts: Receipts, ledger: Ledger) -> None:
    seen = receipts.observe(consumer=COORDINATOR, prefill_tokens=10, decode_tokens=100)  # no API key: its own
    claims = [(10, 54), (0, 46)]  # a prompt and 54 decode steps, then the rest
    signed = [_batch(receipts, seen, i, p, d) for i, (p, d) in enumerate(claims)]
    checker = receipts.checker()
    for receipt in signed:
        ledger.book([checker.check(receipt)])
    ledger.book([checker.check(signed[1])])  # resubmitted: booked once
    booked = ledger.booked_for(seen.session_id, seen.node)
    assert sorted(booked) == [0, 1]
    assert sum(b.prefill_tokens + b.decode_tokens for b in booked.values()) == 110
    flops = {b.institution: b.balance_flops for b in ledger.balances()}
    assert flops["alpha"] == 110 * span_flops_per_token(*BLOCKS) == -flops[COORDINATOR]
    with pytest.raises(ReceiptRejected, match="already billed batch 1"):
        checker.check(_batch(receipts, seen, 1, 0, 1))
    report = verify_ledger(ledger, PoolTrust.load(receipts.pool.directory))
    assert report.ok and report.receipts == 2, report.problems


def test_batches_together_are_capped_at_the_observation_once_the_session_is_over(
    receipts: Receipts, ledger: Ledger
) -> None:
    seen = receipts.observe(consumer=COORDINATOR, prefill_tokens=10, decode_tokens=100)
    live = {seen.session_id}
    checker = receipts.checker(live=lambda session_id: session_id in live)
    first, second = (_batch(receipts, seen, i, 10 * (1 - i), 64) for i in range(2))
    ledger.book([checker.check(first)])
    with pytest.raises(ReceiptPending, match="is live"):  # the observation may still rise
        checker.check(second)
    live.clear()  # over (or the coordinator restarted): the last observation is the ceiling
    booking = checker.check(second)
    assert (booking.payment.prefill_tokens, booking.payment.decode_tokens) == (0, 36)
    assert "of which 10+64 were paid before" in booking.capped
    ledger.book([booking])
    tail = checker.check(_batch(receipts, seen, 2, 0, 5))
    assert tail.payment.flops == 0  # nothing left to pay: booked at zero, so the node can drop it
    ledger.book([tail])
    assert verify_ledger(ledger, PoolTrust.load(receipts.pool.directory)).ok


def test_batches_checked_together_share_the_observation(receipts: Receipts, ledger: Ledger) -> None:
    seen = receipts.observe(prefill_tokens=0, decode_tokens=100)
    checker = receipts.checker()
    first = checker.check(_batch(receipts, seen, 0, 0, 64))
    second = checker.check(_batch(receipts, seen, 1, 0, 64), {0: _booked(first)})
    assert second.payment.decode_tokens == 36


def test_an_observation_is_raised_never_lowered(receipts: Receipts, ledger: Ledger) -> None:
    seen = receipts.observe(prefill_tokens=10, decode_tokens=20)
    ledger.observe([seen.model_copy(update={"id": None, "decode_tokens": 50})])
    ledger.observe(
        [seen.model_copy(update={"id": None, "prefill_tokens": 3, "decode_tokens": 40})]
    )  # a late, older write
    stored = ledger.observation(seen.session_id, seen.node)
    assert stored is not None and (stored.prefill_tokens, stored.decode_tokens) == (10, 50)


def test_two_institutions_nodes_of_one_id_in_one_session_are_each_observed_booked_and_paid(
    receipts: Receipts, ledger: Ledger
) -> None:
    """Node ids are unique only within an institution: alpha's and beta's "gpu-0" serve one session."""
    alpha = receipts.observe("alpha", COORDINATOR, node_id="gpu-0", blocks=(0, 10), prefill_tokens=10, decode_tokens=20)
    beta = alpha.model_copy(update={"provider": "beta", "start_block": 10, "end_block": 30, "decode_tokens": 40})
    checker = receipts.checker()
    with pytest.raises(ReceiptPending, match="on node beta/gpu-0 not recorded yet"):  # not alpha's observation
        checker.check(_batch(receipts, beta, 0, 10, 40))
    ledger.observe([beta])
    stored = ledger.observation(alpha.session_id, alpha.node)  # not overwritten by beta's
    assert stored is not None and (stored.provider, stored.end_block, stored.decode_tokens) == ("alpha", 10, 20)

    ledger.book([checker.check(_batch(receipts, seen, 0, 10, d)) for seen, d in ((alpha, 20), (beta, 40))])
    ledger.book([checker.check(_batch(receipts, seen, 1, 0, 5)) for seen in (alpha, beta)])  # beyond: paid 0

    for seen, tokens in ((alpha, 30), (beta, 50)):
        booked = ledger.booked_for(seen.session_id, seen.node)
        assert sorted(booked) == [0, 1] and sum(b.prefill_tokens + b.decode_tokens for b in booked.values()) == tokens
    flops = {b.institution: b.balance_flops for b in ledger.balances()}
    assert (flops["alpha"], flops["beta"]) == (30 * span_flops_per_token(0, 10), 50 * span_flops_per_token(10, 30))
    assert flops[COORDINATOR] == -(flops["alpha"] + flops["beta"])
    report = verify_ledger(ledger, PoolTrust.load(receipts.pool.directory))
    assert report.ok and report.receipts == 4, report.problems
