"""The coordinator's checks on a receipt before it is booked, and its countersignature.

A receipt is booked only if: its body parses; it is for this pool, this model and this
coordinator; the node's certificate was issued by the pool CA and names the institution the
receipt credits; the node's signature covers the exact bytes; its FLOPs are its tokens times the
manifest's FLOPs per token for its blocks; and it claims no more tokens, for no other blocks, than
the coordinator itself saw that node process in that session. Anything else is rejected and
recorded as an audit event. A receipt whose session the coordinator has not written down yet is
left pending (the node resubmits it), unless it is older than `unknown_session_grace_s`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from coop.errors import InvalidInput, ReceiptPending, ReceiptRejected, Unauthorized
from coop.ledger.models import Observation
from coop.ledger.store import Booking
from coop.pool.bundle import MemberBundle
from coop.pool.ca import ROLE_NODE, verify_signature
from coop.pool.identity import Identity, verify_identity
from coop.receipts import ReceiptBody, SignedReceipt, body_payload, countersign_payload

UNKNOWN_SESSION_GRACE_S = 3600.0
CLOCK_SKEW_S = 300.0  # a receipt may end this far in the coordinator's future, no further


@dataclass
class ReceiptChecker:
    pool_id: str
    ca_cert_pem: bytes
    model_hash: str
    span_flops_per_token: Callable[[int, int], int]  # the manifest's, for blocks [start, end)
    signer: MemberBundle  # the coordinator's own credentials: it countersigns with them
    observation: Callable[[str, str], Observation | None]  # (session_id, node_id) -> what it saw
    # (session_id, node_id) -> the id of the receipt already booked for it, if any
    booked_for: Callable[[str, str], str | None]
    unknown_session_grace_s: float = UNKNOWN_SESSION_GRACE_S

    @property
    def coordinator(self) -> str:
        return self.signer.institution

    def check(self, signed: SignedReceipt) -> Booking:
        """A Booking, or ReceiptRejected (never bookable) / ReceiptPending (try again later)."""
        body = self._authentic_body(signed)
        if body.pool_id != self.pool_id:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for pool {body.pool_id!r}, not {self.pool_id!r}")
        if body.coordinator != self.coordinator:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for coordinator {body.coordinator!r}")
        if body.ended_at > time.time() + CLOCK_SKEW_S:
            raise ReceiptRejected(f"receipt {body.receipt_id} ends in the future ({body.ended_at:.0f})")
        if body.model_hash != self.model_hash:
            raise ReceiptRejected(f"receipt {body.receipt_id} is for another model ({body.model_hash[:12]})")
        expected_flops = body.tokens * self.span_flops_per_token(body.start_block, body.end_block)
        if body.flops != expected_flops:
            raise ReceiptRejected(
                f"receipt {body.receipt_id} claims {body.flops} FLOPs; its tokens on blocks "
                f"{body.start_block}:{body.end_block} make {expected_flops}"
            )
        seen = self.observation(body.session_id, body.node_id)
        if seen is None:
            if time.time() - body.ended_at > self.unknown_session_grace_s:
                raise ReceiptRejected(
                    f"receipt {body.receipt_id}: this coordinator never saw session {body.session_id}"
                )
            raise ReceiptPending(f"receipt {body.receipt_id}: session {body.session_id} not recorded yet")
        _check_against(body, seen)
        earlier = self.booked_for(body.session_id, body.node_id)
        if earlier is not None and earlier != body.receipt_id:
            raise ReceiptRejected(
                f"receipt {body.receipt_id}: node {body.node_id} already billed session {body.session_id} "
                f"with receipt {earlier}"
            )
        payload = countersign_payload(signed.body, seen.consumer)
        return Booking(body, signed, seen.consumer, self.signer.sign(payload), self.signer.cert_pem)

    def _authentic_body(self, signed: SignedReceipt) -> ReceiptBody:
        try:
            body = ReceiptBody.from_bytes(signed.body)
        except (InvalidInput, TypeError) as exc:
            raise ReceiptRejected(f"malformed receipt: {exc}") from exc
        try:
            signer = _certified_node(self.ca_cert_pem, signed.cert_pem, self.pool_id)
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
        return body


def _check_against(body: ReceiptBody, seen: Observation) -> None:
    """The receipt may claim less than the coordinator saw (a step lost in a crash), never more."""
    rid = body.receipt_id
    if seen.provider != body.institution:
        raise ReceiptRejected(
            f"receipt {rid}: node {body.node_id} served for {seen.provider!r}, not {body.institution!r}"
        )
    if (seen.start_block, seen.end_block) != (body.start_block, body.end_block):
        raise ReceiptRejected(
            f"receipt {rid}: blocks {body.start_block}:{body.end_block}, "
            f"but the session used {seen.start_block}:{seen.end_block} on that node"
        )
    if body.prefill_tokens > seen.prefill_tokens or body.decode_tokens > seen.decode_tokens:
        raise ReceiptRejected(
            f"receipt {rid} claims {body.prefill_tokens}+{body.decode_tokens} tokens, "
            f"the coordinator sent {seen.prefill_tokens}+{seen.decode_tokens}"
        )


@functools.lru_cache(maxsize=256)
def _certified_node(ca_cert_pem: bytes, cert_pem: bytes, pool_id: str) -> Identity:
    """Cached: a process checks each node certificate once (a failure is not cached: it raises)."""
    return verify_identity(ca_cert_pem, cert_pem, pool_id=pool_id).require(ROLE_NODE)
