"""The coordinator's checks on a receipt: every dishonest or foreign receipt is rejected, an early one waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from coop.errors import ReceiptPending, ReceiptRejected, Unauthorized
from coop.ledger.models import Observation
from coop.pool.ca import verify_signature
from coop.receipts import Payment, SignedReceipt, countersign_payload
from tests.ledger.conftest import Receipts
from tests.pools import make_member_pool

Forge = Callable[[Receipts, Observation, Path], SignedReceipt]
GRACE_S = 120.0


def flipped_byte(signed: SignedReceipt) -> SignedReceipt:
    """The body with one hex digit of its receipt id changed: still a valid body, no longer what was signed."""
    at = signed.body.index(b'"receipt_id":"') + len(b'"receipt_id":"')
    digit = b"1" if signed.body[at : at + 1] != b"1" else b"2"
    return replace(signed, body=signed.body[:at] + digit + signed.body[at + 1 :])


def other_pools_alpha(receipts: Receipts, seen: Observation, tmp_path: Path) -> SignedReceipt:
    """An "alpha" certified by another pool's CA, claiming work in this pool."""
    impostor = make_member_pool(tmp_path / "other-pool", "other", members=("alpha",))["alpha"]
    return receipts.sign(receipts.body(seen), signer=impostor)


FORGERIES: dict[str, tuple[Forge, str]] = {
    "flops not matching the tokens": (
        lambda r, seen, _: r.sign(r.body(seen, flops=r.body(seen).flops + 1)),
        "FLOPs",
    ),
    "a byte of the body flipped": (lambda r, seen, _: flipped_byte(r.sign(r.body(seen))), "signature does not match"),
    "signed by beta, crediting alpha": (
        lambda r, seen, _: r.sign(r.body(seen), signer=r.pool["beta"]),
        "signed by 'beta'",
    ),
    "a certificate from another pool's CA": (other_pools_alpha, "belongs to pool"),
    "another model": (lambda r, seen, _: r.sign(r.body(seen, model_hash="cd34")), "another model"),
    "another coordinator": (lambda r, seen, _: r.sign(r.body(seen, coordinator="beta")), "for coordinator 'beta'"),
    "another pool id": (lambda r, seen, _: r.sign(r.body(seen, pool_id="0123456789abcdef")), "is for pool"),
    "other blocks than observed": (lambda r, seen, _: r.sign(r.body(seen, end_block=11)), "the session used 0:10"),
    "a body that is not JSON": (lambda r, seen, _: replace(r.sign(r.body(seen)), body=b"{not json"), "malformed"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_or_foreign_receipt_is_rejected(receipts: Receipts, tmp_path: Path, forgery: str) -> None:
    forge, reason = FORGERIES[forgery]
    seen = receipts.observe("alpha", "beta")

    with pytest.raises(ReceiptRejected, match=reason):
        receipts.checker().check(forge(receipts, seen, tmp_path))


def test_an_honest_receipt_is_countersigned_for_the_consumer_and_key_the_coordinator_saw(receipts: Receipts) -> None:
    seen = receipts.observe("alpha", "beta", api_key_id="0123456789abcdef")
    body = receipts.body(seen)
    signed = receipts.sign(body)

    booking = receipts.checker().check(signed)

    assert (booking.body.institution, booking.consumer, booking.signed, booking.capped) == ("alpha", "beta", signed, "")
    paid = Payment("beta", "0123456789abcdef", body.prefill_tokens, body.decode_tokens, body.flops)
    assert booking.payment == paid
    coordinator = receipts.pool["coord"]
    assert booking.coordinator_cert_pem == coordinator.cert_pem
    verify_signature(coordinator.cert_pem, countersign_payload(signed.body, paid), booking.countersignature)
    for other in (replace(paid, consumer="alpha"), replace(paid, api_key_id=""), replace(paid, flops=paid.flops - 1)):
        with pytest.raises(Unauthorized):  # the countersignature binds each term
            verify_signature(coordinator.cert_pem, countersign_payload(signed.body, other), booking.countersignature)


CLAIMS_BEYOND_THE_OBSERVATION = {
    "one decode token more": ({"decode_tokens": 21}, (7, 20)),
    "five prefill tokens more, no decode": ({"prefill_tokens": 12, "decode_tokens": 0}, (7, 0)),
    "both more": ({"prefill_tokens": 9, "decode_tokens": 30}, (7, 20)),
}


@pytest.mark.parametrize("claim", list(CLAIMS_BEYOND_THE_OBSERVATION))
def test_a_claim_beyond_the_observation_is_paid_what_was_observed_and_audited(receipts: Receipts, claim: str) -> None:
    """A token injected into a node by someone else (or a node's lie) must not void its pay for the rest."""
    claimed, (prefill, decode) = CLAIMS_BEYOND_THE_OBSERVATION[claim]
    seen = receipts.observe(prefill_tokens=7, decode_tokens=20)
    body = receipts.body(seen, **claimed)

    booking = receipts.checker().check(receipts.sign(body))

    paid_flops = (prefill + decode) * 10 * 1000
    assert (booking.payment.prefill_tokens, booking.payment.decode_tokens, booking.payment.flops) == (
        prefill,
        decode,
        paid_flops,
    )
    assert receipts.ledger.book([booking]) == [body.receipt_id]
    assert receipts.ledger.balance("alpha").balance_flops == paid_flops  # type: ignore[union-attr]
    [row] = receipts.ledger.receipts()
    assert (row.prefill_tokens, row.decode_tokens, row.flops) == (prefill, decode, paid_flops)
    [event] = receipts.ledger.audit_events(action="receipt_capped")
    assert event.subject == body.receipt_id and f"paid {prefill}+{decode} tokens" in event.detail
    assert receipts.ledger.book([booking]) == [] and len(receipts.ledger.audit_events(action="receipt_capped")) == 1


def test_a_receipt_may_claim_less_than_was_observed(receipts: Receipts) -> None:
    """A node that crashed mid-session lost its last steps: it claims fewer tokens, never more."""
    seen = receipts.observe(prefill_tokens=7, decode_tokens=20)
    body = receipts.body(seen, decode_tokens=12)

    booking = receipts.checker().check(receipts.sign(body))

    assert booking.body.flops == 19 * 10 * 1000
    assert receipts.ledger.book([booking]) == [body.receipt_id]


def test_a_receipt_for_a_session_not_yet_written_down_is_pending(receipts: Receipts) -> None:
    unseen = receipts.observe(record=False)

    with pytest.raises(ReceiptPending):
        receipts.checker().check(receipts.sign(receipts.body(unseen)))


def test_a_receipt_for_a_session_never_seen_is_rejected_after_the_grace_period(receipts: Receipts) -> None:
    """(A shorter grace than the default: the pool's certificates are minutes old, and a receipt must end
    while its signer's certificate is valid.)"""
    unseen = receipts.observe(record=False)
    ended = time.time() - GRACE_S - 60
    body = receipts.body(unseen, started_at=ended - 5, ended_at=ended)

    with pytest.raises(ReceiptRejected, match=f"never saw session {unseen.session_id}"):
        receipts.checker(unknown_session_grace_s=GRACE_S).check(receipts.sign(body))
    with pytest.raises(ReceiptPending):
        receipts.checker(unknown_session_grace_s=GRACE_S + 120).check(receipts.sign(body))


def test_a_receipt_of_another_served_model_is_paid_at_that_model_s_flops(receipts: Receipts) -> None:
    """A coordinator serving several models checks each receipt against its own model's manifest."""
    default_flops = receipts.checker().span_flops_per_token

    def other_flops(start: int, end: int) -> int:
        return 3 * default_flops(start, end)

    checker = receipts.checker(other_models={"cd34": other_flops})
    seen = receipts.observe(record=False)
    seen.model_hash = "cd34"  # what the coordinator saw the session run
    receipts.ledger.observe([seen])
    at_default = receipts.body(seen, model_hash="cd34")
    honest = replace(at_default, flops=at_default.tokens * other_flops(seen.start_block, seen.end_block))
    with pytest.raises(ReceiptRejected, match="FLOPs"):
        checker.check(receipts.sign(at_default))  # the other model's tokens, priced as the default model's
    booking = checker.check(receipts.sign(honest))
    assert booking.payment.flops == honest.flops == 3 * at_default.flops > 0
    with pytest.raises(ReceiptRejected, match="another model"):
        checker.check(receipts.sign(receipts.body(seen, model_hash="ef56")))
    # the default model is served too, but the session ran the other one: no claim at its price
    with pytest.raises(ReceiptRejected, match="the session ran model cd34"):
        checker.check(receipts.sign(receipts.body(seen)))
