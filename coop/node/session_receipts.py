"""The node's side of billing: a signed receipt for every batch of every session, kept in the outbox
until the coordinator that opened the session collects and settles it.

Writing a receipt never fails a step or a session: a batch that could not be written stays open and
goes with the next step or the session's end (coop/node/receipt_batches.py).
"""

from __future__ import annotations

import asyncio
import logging

from coop.model.manifest import Manifest
from coop.node.receipt_batches import ReceiptWriter
from coop.node.sessions import LiveSession
from coop.wire.generated import coop_pb2 as pb
from coop.wire.receipts import receipt_to_proto

log = logging.getLogger(__name__)

DEFAULT_RECEIPTS_PER_CALL = 100


class SessionReceipts:
    """`writer` None (development mode): no receipt is written, and none is handed out."""

    def __init__(self, writer: ReceiptWriter | None) -> None:
        self.writer = writer

    def serve_manifest(self, manifest: Manifest) -> None:
        """Bill the model served from now on (a rebalance move)."""
        if self.writer is not None:
            self.writer.manifest = manifest

    def stepped(self, live: LiveSession, tokens: int) -> None:
        """Count a step; a batch it fills is written to the outbox at once."""
        if self.writer is None:
            return
        try:
            self.writer.stepped(live.session_id, live.blocks, live.meter, tokens)
        except Exception:  # the batch stays open and is written with the next step or at the end
            log.exception("could not write a receipt of session %s", live.session_id)

    def ended(self, live: LiveSession) -> None:
        """Write the session's last batch."""
        if self.writer is None:
            return
        try:
            self.writer.ended(live.session_id, live.blocks, live.meter)
        except Exception:  # the session is over either way; losing one receipt must not crash the node
            log.exception("could not write the receipt of session %s", live.session_id)

    async def pending(self, coordinator: str, limit: int) -> list[pb.SignedReceipt]:
        """Up to `limit` (0: the default) receipts the coordinator has not settled yet."""
        if self.writer is None:
            return []
        pending = await asyncio.to_thread(self.writer.outbox.pending, coordinator, limit or DEFAULT_RECEIPTS_PER_CALL)
        return [receipt_to_proto(receipt_id, receipt) for receipt_id, receipt in pending]

    async def settle(self, coordinator: str, booked: list[str], rejected: list[str]) -> None:
        """The coordinator booked or rejected these receipts: the outbox lets them go."""
        if self.writer is not None:
            await asyncio.to_thread(self.writer.outbox.acknowledge, coordinator, booked, rejected)
