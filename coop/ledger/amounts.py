"""Exact amounts of FLOPs in 64-bit SQL columns, the same on SQLite and PostgreSQL.

A pool's totals outgrow 64 bits quickly: 2**63 FLOPs is 9.2 million credits, a few hours of a
hundred GPUs, and one grant of 10**9 credits is already 10**21 FLOPs. SQLite has no exact type
wider than 64 bits (its SUM raises on overflow, its NUMERIC falls back to floating point), so an
amount that may exceed 64 bits is stored split in two integer columns::

    amount = hi * UNIT + lo,   0 <= lo < UNIT,   UNIT = 10**9

Each column fits 64 bits for amounts up to 9.2 * 10**27 FLOPs (9.2 * 10**15 credits), and the SQL
SUM of each column stays within 64 bits for up to 9.2 * 10**9 rows, so `sum(hi) * UNIT + sum(lo)`,
joined in Python, is exact. Amounts stored in one 64-bit column (a receipt's FLOPs, at most 2**62)
are summed the same way, split at query time (`exact_sum`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case
from sqlalchemy.sql import func
from sqlalchemy.sql.elements import ColumnElement

from coop.errors import InvalidInput

UNIT = 10**9
INT64_MAX = 2**63 - 1
MAX_FLOPS = INT64_MAX * UNIT  # the largest amount two columns hold (about 9.2 * 10**15 credits)


def split(flops: int) -> tuple[int, int]:
    """(hi, lo) to store; InvalidInput beyond what the columns hold."""
    if not -MAX_FLOPS <= flops <= MAX_FLOPS:
        raise InvalidInput(f"{flops} FLOPs is beyond the ledger's range of +-{MAX_FLOPS} FLOPs")
    return divmod(flops, UNIT)


def join(hi: Any, lo: Any) -> int:
    """The amount from its two parts (None, from an SQL SUM over no rows, counts as 0)."""
    return int(hi or 0) * UNIT + int(lo or 0)


def split_sum(hi: Any, lo: Any, where: ColumnElement[bool] | None = None) -> tuple[ColumnElement[Any], ...]:
    """Two SQL sums (of rows matching `where`, if given) that `join` makes the exact total of a split amount."""
    if where is None:
        return func.sum(hi), func.sum(lo)
    return func.sum(case((where, hi), else_=0)), func.sum(case((where, lo), else_=0))


def exact_sum(column: Any) -> tuple[ColumnElement[Any], ...]:
    """Two SQL sums that `join` makes the exact total of a 64-bit integer column (truncating division and
    remainder agree on both databases, so hi * UNIT + lo is each value, whatever its sign)."""
    return func.sum(column // UNIT), func.sum(column % UNIT)
