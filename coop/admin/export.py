"""CSV exports of receipts and the audit log, streamed a chunk of rows at a time."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence

from coop.admin import queries
from coop.admin.context import AdminContext
from coop.admin.queries import AuditFilter, ReceiptFilter, as_utc
from coop.ledger.models import flops_to_credits

RECEIPT_COLUMNS = [
    "receipt_id",
    "session_id",
    "node_id",
    "provider",
    "consumer",
    "start_block",
    "end_block",
    "prefill_tokens",
    "decode_tokens",
    "flops",
    "credits",
    "started_at",
    "ended_at",
    "booked_at",
]
AUDIT_COLUMNS = ["id", "at", "actor", "action", "subject", "detail"]


def cell(value: object) -> str:
    """A cell a spreadsheet shows as text: a leading =, +, -, @ (a formula) is defused with a quote."""
    text = str(value)
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def csv_lines(rows: Iterable[Iterable[object]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for row in rows:
        writer.writerow([cell(v) for v in row])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def receipts_csv(ctx: AdminContext, filters: ReceiptFilter) -> Iterator[str]:
    def rows() -> Iterator[Sequence[object]]:
        yield RECEIPT_COLUMNS
        for r in queries.iter_receipts(ctx.ledger.engine, filters):
            yield [
                r.receipt_id,
                r.session_id,
                r.node_id,
                r.provider,
                r.consumer,
                r.start_block,
                r.end_block,
                r.prefill_tokens,
                r.decode_tokens,
                r.flops,
                f"{flops_to_credits(r.flops):.6f}",
                as_utc(r.started_at).isoformat(),
                as_utc(r.ended_at).isoformat(),
                as_utc(r.booked_at).isoformat(),
            ]

    return csv_lines(rows())


def audit_csv(ctx: AdminContext, filters: AuditFilter) -> Iterator[str]:
    def rows() -> Iterator[Sequence[object]]:
        yield AUDIT_COLUMNS
        for e in queries.iter_audit(ctx.ledger.engine, filters):
            yield [e.id, as_utc(e.at).isoformat(), e.actor, e.action, e.subject, e.detail]

    return csv_lines(rows())
