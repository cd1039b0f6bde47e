"""The coordinator's checks on a receipt before it is booked, and its countersignature.

A receipt is booked only if: its body parses; it is for this pool, this model and this
coordinator; the node's certificate was issued by the pool CA, was valid when the work ended and
names the institution the receipt credits; that institution was not revoked before the work ended;
the node's signature covers the exact bytes; its FLOPs are its tokens times the manifest's FLOPs
per token for its blocks; and it is for the blocks the coordinator itself saw that node serve in
that session. Anything else is rejected and recorded as an audit event. A node is its (institution,
node id) here as everywhere: two institutions' "gpu-0" in one session are two nodes, each observed
and paid for its own work.

A node bills its part of a session in numbered batches, each once (a second receipt for a booked
batch is rejected). Together they are paid at most what the coordinator sent that node: a batch is
paid its claim up to what the observation leaves after the batches booked before it. A claim beyond
that, while the session is still live in this coordinator, waits (the observation is raised as the
session goes on); once it is over, or after a restart of the coordinator (whose last observation is
then all there is), it is paid what is left (the node may have been fed tokens by someone else, or
be lying; either way the coordinator's count is what the consumer asked for), and the difference is
an audit event. A receipt whose session the coordinator has not written down yet is left pending
(the node resubmits it), unless it is older than `unknown_session_grace_s`.

The consumer and the API key that admitted the session come from the coordinator's observation,
never from the node; the countersignature covers both, so `verify` can check the key was the
consumer's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from coop.errors import InvalidInput, ReceiptPending, ReceiptRejected, Unauthorized
from coop.ledger.models import Observation
from coop.ledger.queries import BookedBatch
from coop.ledger.signers import provider_of
from coop.ledger.store import Booking
from coop.pool.bundle import MemberBundle
from coop.pool.ca import verify_signature
from coop.receipts import Payment, ReceiptBody, SignedReceipt, body_payload, countersign_payload
from coop.swarm.node_key import NodeKey, key_of

UNKNOWN_SESSION_GRACE_S = 3600.0
CLOCK_SKEW_S = 300.0  # a receipt may end this far in the coordinator's future, no further


def never_revoked(_institution: str) -> float | None:
    return None


def never_live(_session_id: str) -> bool:
    return False


@dataclass
class ReceiptChecker:
    pool_id: str
    ca_cert_pem: bytes
    model_hash: str
    span_flops_per_token: Callable[[int, int], int]  # the manifest's, for blocks [start, end)
    signer: MemberBundle  # the coordinator's own credentials: it countersigns with them
    observation: Callable[[str, NodeKey], Observation | None]  # (session_id, node) -> what it saw
    # (session_id, node) -> the batches of it already booked, by batch number
    booked_for: Callable[[str, NodeKey], Mapping[int, BookedBatch]]
    # institution -> when it was revoked (unix seconds), None if it is not: its work after that is not paid
    revoked_since: Callable[[str], float | None] = never_revoked
    # whether this coordinator process still runs a session (its observation may still rise)
    live: Callable[[str], bool] = never_live
    unknown_session_grace_s: float = UNKNOWN_SESSION_GRACE_S
    # the other models the coordinator serves: model hash -> its manifest's span FLOPs per token
    other_models: Mapping[str, Callable[[int, int], int]] = field(default_factory=dict)

    @property
    def coordinator(self) -> str:
        return self.signer.institution

    def check(self, signed: SignedReceipt, unbooked: Mapping[int, BookedBatch] | None = None) -> Booking:
        """A Booking, or ReceiptRejected (never bookable) / ReceiptPending (try again later).

        `unbooked`: batches of the same (session, node) checked before this one, to be booked with it.
        """
        body = self._authentic_body(signed)
        if body.pool_id != self.pool_id:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for pool {body.pool_id!r}, not {self.pool_id!r}")
        if body.coordinator != self.coordinator:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for coordinator {body.coordinator!r}")
        if body.ended_at > time.time() + CLOCK_SKEW_S:
            raise ReceiptRejected(f"receipt {body.receipt_id} ends in the future ({body.ended_at:.0f})")
        span_flops = self._span_flops(body)
        expected_flops = body.tokens * span_flops(body.start_block, body.end_block)
        if body.flops != expected_flops:
            raise ReceiptRejected(
                f"receipt {body.receipt_id} claims {body.flops} FLOPs; its tokens on blocks "
                f"{body.start_block}:{body.end_block} make {expected_flops}"
            )
        node = key_of(body)
        seen = self.observation(body.session_id, node)
        if seen is None:
            if time.time() - body.ended_at > self.unknown_session_grace_s:
                raise ReceiptRejected(
                    f"receipt {body.receipt_id}: this coordinator never saw session {body.session_id} on node {node}"
                )
            raise ReceiptPending(
                f"receipt {body.receipt_id}: session {body.session_id} on node {node} not recorded yet"
            )
        booked = {**self.booked_for(body.session_id, node), **(unbooked or {})}
        earlier = booked.pop(body.batch, None)
        if earlier is not None and earlier.receipt_id != body.receipt_id:
            raise ReceiptRejected(
                f"receipt {body.receipt_id}: node {node} already billed batch {body.batch} of session "
                f"{body.session_id} with receipt {earlier.receipt_id}"
            )
        paid = (sum(b.prefill_tokens for b in booked.values()), sum(b.decode_tokens for b in booked.values()))
        flops_per_token = span_flops(body.start_block, body.end_block)
        payment, capped = _payment(body, seen, paid, flops_per_token, live=self.live(body.session_id))
        countersignature = self.signer.sign(countersign_payload(signed.body, payment))
        return Booking(body, signed, payment, countersignature, self.signer.cert_pem, capped)

    def _span_flops(self, body: ReceiptBody) -> Callable[[int, int], int]:
        """The FLOPs per token of the receipt's model: each model is paid at its own manifest's."""
        if body.model_hash == self.model_hash:
            return self.span_flops_per_token
        other = self.other_models.get(body.model_hash)
        if other is None:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for another model ({body.model_hash[:12]})")
        return other

    def _authentic_body(self, signed: SignedReceipt) -> ReceiptBody:
        try:
            body = ReceiptBody.from_bytes(signed.body)
        except (InvalidInput, TypeError) as exc:
            raise ReceiptRejected(f"malformed receipt: {exc}") from exc
        try:
            signer = provider_of(self.ca_cert_pem, signed.cert_pem, self.pool_id, body.ended)
            verify_signature(signed.cert_pem, body_payload(signed.body), signed.signature)
        except Unauthorized as exc:
            raise ReceiptRejected(f"receipt {body.receipt_id}: {exc}") from exc
        institution = signer.institution
        if signer.node_id != body.node_id:
            raise ReceiptRejected(
                f"receipt {body.receipt_id} is for node {body.node_id!r}, signed by {signer.describe()}"
            )
        if institution != body.institution:
            raise ReceiptRejected(
                f"receipt {body.receipt_id} credits {body.institution!r} but is signed by {institution!r}"
            )
        revoked_at = self.revoked_since(institution)
        if revoked_at is not None and body.ended_at >= revoked_at:
            raise ReceiptRejected(
                f"receipt {body.receipt_id}: its work ended after {institution!r} was revoked from the pool"
            )
        return body


def _payment(
    body: ReceiptBody, seen: Observation, paid: tuple[int, int], flops_per_token: int, *, live: bool
) -> tuple[Payment, str]:
    """What the batch is paid: its claim, capped at what the coordinator saw less what the session's
    other batches were `paid` (prefill, decode); and, if capped, why.

    A node may claim less than the coordinator saw (a batch lost in a crash). A claim of other blocks or
    another model is no receipt of what was seen at all, and is rejected.
    """
    rid = body.receipt_id
    if seen.model_hash and seen.model_hash != body.model_hash:
        raise ReceiptRejected(
            f"receipt {rid}: model {body.model_hash[:12]}, but the session ran model {seen.model_hash[:12]}"
        )
    if (seen.start_block, seen.end_block) != (body.start_block, body.end_block):
        raise ReceiptRejected(
            f"receipt {rid}: blocks {body.start_block}:{body.end_block}, "
            f"but the session used {seen.start_block}:{seen.end_block} on that node"
        )
    left = (max(seen.prefill_tokens - paid[0], 0), max(seen.decode_tokens - paid[1], 0))
    prefill, decode = min(body.prefill_tokens, left[0]), min(body.decode_tokens, left[1])
    payment = Payment(seen.consumer, seen.api_key_id, prefill, decode, (prefill + decode) * flops_per_token)
    if (prefill, decode) == (body.prefill_tokens, body.decode_tokens):
        return payment, ""
    if live:
        raise ReceiptPending(f"receipt {rid}: session {body.session_id} is live; its observation is behind the claim")
    return payment, (
        f"receipt {rid} (batch {body.batch}) claims {body.prefill_tokens}+{body.decode_tokens} tokens, the "
        f"coordinator sent {seen.prefill_tokens}+{seen.decode_tokens} of which {paid[0]}+{paid[1]} were paid "
        f"before: paid {prefill}+{decode} tokens ({payment.flops} FLOPs, not {body.flops})"
    )
