"""What a node computed for each session, and the signed receipt it leaves in its outbox at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from coop.model.manifest import Manifest
from coop.node.outbox import Outbox
from coop.pool.bundle import Credentials
from coop.receipts import ReceiptBody, TokenTally, new_receipt_id, sign_receipt


@dataclass
class SessionMeter:
    start: int
    end: int
    coordinator: str  # the institution (or, in development, the address) that opened the session
    priority: float = 0.0
    tokens: TokenTally = field(default_factory=TokenTally)
    started_at: float = field(default_factory=time.time)


class ReceiptWriter:
    """Signs a receipt with the node's own key for every session that computed anything."""

    def __init__(self, bundle: Credentials, outbox: Outbox, manifest: Manifest, node_id: str) -> None:
        self.bundle = bundle
        self.outbox = outbox
        self.manifest = manifest
        self.node_id = node_id

    def write(self, session_id: str, meter: SessionMeter) -> str | None:
        """The receipt id, or None when the session computed nothing."""
        tokens = meter.tokens.total
        if tokens == 0:
            return None
        body = ReceiptBody(
            receipt_id=new_receipt_id(),
            pool_id=self.bundle.pool_id,
            session_id=session_id,
            node_id=self.node_id,
            institution=self.bundle.institution,
            coordinator=meter.coordinator,
            model_hash=self.manifest.content_hash,
            start_block=meter.start,
            end_block=meter.end,
            prefill_tokens=meter.tokens.prefill,
            decode_tokens=meter.tokens.decode,
            flops=tokens * self.manifest.span_flops_per_token(meter.start, meter.end),
            started_at=meter.started_at,
            ended_at=max(time.time(), meter.started_at),
        )
        self.outbox.add(body.receipt_id, meter.coordinator, sign_receipt(self.bundle, body))
        return body.receipt_id
