"""What a node computed for each session, in batches, and the signed receipt it leaves in its outbox for each.

A session's steps are billed in batches: a batch closes at the first step that brings it to
`batch_tokens` tokens or that comes `batch_s` seconds after the batch began, and the last one when
the session ends. Each closed batch is signed and written (fsynced) to the outbox at once, numbered
0, 1, 2, ... within the session, so a `kill -9` loses only the open batch, and a gap in the numbers
shows what was lost. A batch that computed nothing is not billed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from coop.model.manifest import Manifest
from coop.node.outbox import Outbox
from coop.pool.bundle import Credentials
from coop.receipts import ReceiptBody, TokenTally, new_receipt_id, sign_receipt

BATCH_TOKENS = 64
BATCH_S = 30.0

Blocks = tuple[int, int]  # the [start, end) blocks a session runs through on this node


@dataclass
class SessionMeter:
    """A session's open batch: what it computed since its last receipt, and who pays for it."""

    coordinator: str  # the institution (or, in development, the address) that opened the session
    tokens: TokenTally = field(default_factory=TokenTally)  # of the open batch
    batch: int = 0  # the open batch's number
    started_at: float = field(default_factory=time.time)  # when the open batch began


class ReceiptWriter:
    """Signs a receipt with the node's own key for every batch of a session that computed anything."""

    def __init__(
        self,
        bundle: Credentials,
        outbox: Outbox,
        manifest: Manifest,
        node_id: str,
        *,
        batch_tokens: int = BATCH_TOKENS,
        batch_s: float = BATCH_S,
    ) -> None:
        self.bundle = bundle
        self.outbox = outbox
        self.manifest = manifest
        self.node_id = node_id
        self.batch_tokens = batch_tokens
        self.batch_s = batch_s

    def stepped(self, session_id: str, blocks: Blocks, meter: SessionMeter, tokens: int) -> str | None:
        """Count a step's tokens through `blocks` (start, end); the receipt id if that closed the batch, else None."""
        if meter.tokens.total == 0:
            meter.started_at = time.time()  # a batch begins with its first step, not after an idle wait
        meter.tokens.add(tokens)
        if meter.tokens.total >= self.batch_tokens or time.time() - meter.started_at >= self.batch_s:
            return self.ended(session_id, blocks, meter)
        return None

    def ended(self, session_id: str, blocks: Blocks, meter: SessionMeter) -> str | None:
        """Close the open batch (the session ended, or the batch is full): its receipt id, or None if it is empty."""
        tokens = meter.tokens.total
        start, end = blocks
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
            start_block=start,
            end_block=end,
            prefill_tokens=meter.tokens.prefill,
            decode_tokens=meter.tokens.decode,
            flops=tokens * self.manifest.span_flops_per_token(start, end),
            started_at=meter.started_at,
            ended_at=max(time.time(), meter.started_at),
            batch=meter.batch,
        )
        self.outbox.add(body.receipt_id, meter.coordinator, sign_receipt(self.bundle, body))
        meter.tokens = TokenTally()
        meter.batch += 1
        return body.receipt_id
