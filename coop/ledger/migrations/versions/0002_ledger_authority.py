"""ledger authority: exact amounts, admin-signed grants and floors, API keys on observations and receipts

Amounts of postings and grants move from one 64-bit column to two (hi * 10**9 + lo, see
coop.ledger.amounts); credit floors move from institutions to the append-only, signed
credit_floors table; observations and receipts name the API key that admitted their session.

Rows written before this revision carry no admin signature (grants, floors) or a countersignature
of the old form (receipts): `coop ledger verify` reports them, as it must report anything it
cannot check. Floors are carried over as they were, so spending limits stay in force.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIT = 10**9


def _lo(column: str) -> str:
    """The non-negative remainder, whichever way the database rounds integer division."""
    return f"((({column} % {UNIT}) + {UNIT}) % {UNIT})"


def _hi(column: str) -> str:
    return f"(({column} - {_lo(column)}) / {UNIT})"


def _split_column(table: str, source: str, hi: str, lo: str) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.add_column(sa.Column(hi, sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column(lo, sa.BigInteger(), nullable=True))
    op.execute(f"UPDATE {table} SET {hi} = {_hi(source)}, {lo} = {_lo(source)}")
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.alter_column(hi, existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column(lo, existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_column(source)


def _join_column(table: str, target: str, hi: str, lo: str) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.add_column(sa.Column(target, sa.BigInteger(), nullable=True))
    op.execute(f"UPDATE {table} SET {target} = {hi} * {UNIT} + {lo}")
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.alter_column(target, existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_column(hi)
        batch_op.drop_column(lo)


def upgrade() -> None:
    for table in ("observations", "receipts"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("api_key_id", sa.String(length=16), nullable=False, server_default=""))
    _split_column("postings", "amount_flops", "amount_hi", "amount_lo")
    _split_column("grants", "flops", "amount_hi", "amount_lo")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("signature", sa.LargeBinary(), nullable=True))
    op.get_bind().execute(sa.text("UPDATE grants SET body = :empty, signature = :empty"), {"empty": b""})
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.alter_column("body", existing_type=sa.LargeBinary(), nullable=False)
        batch_op.alter_column("signature", existing_type=sa.LargeBinary(), nullable=False)

    op.create_table(
        "credit_floors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("institution", sa.String(length=128), nullable=False),
        sa.Column("floor_hi", sa.BigInteger(), nullable=True),
        sa.Column("floor_lo", sa.BigInteger(), nullable=True),
        sa.Column("set_by", sa.String(length=128), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["institution"], ["institutions.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("credit_floors", schema=None) as batch_op:
        batch_op.create_index("ix_credit_floors_institution", ["institution", "id"], unique=False)
    op.get_bind().execute(
        sa.text(
            "INSERT INTO credit_floors (institution, floor_hi, floor_lo, set_by, set_at, body, signature) "
            f"SELECT name, {_hi('credit_floor_flops')}, {_lo('credit_floor_flops')}, 'before signed floors', "
            "CURRENT_TIMESTAMP, :empty, :empty FROM institutions WHERE credit_floor_flops IS NOT NULL "
            "ORDER BY name"
        ),
        {"empty": b""},
    )
    with op.batch_alter_table("institutions", schema=None) as batch_op:
        batch_op.drop_column("credit_floor_flops")


def downgrade() -> None:
    with op.batch_alter_table("institutions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("credit_floor_flops", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE institutions SET credit_floor_flops = (SELECT f.floor_hi * 1000000000 + f.floor_lo "
        "FROM credit_floors f WHERE f.institution = institutions.name ORDER BY f.id DESC LIMIT 1)"
    )
    with op.batch_alter_table("credit_floors", schema=None) as batch_op:
        batch_op.drop_index("ix_credit_floors_institution")
    op.drop_table("credit_floors")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_column("signature")
        batch_op.drop_column("body")
    _join_column("grants", "flops", "amount_hi", "amount_lo")
    _join_column("postings", "amount_flops", "amount_hi", "amount_lo")
    for table in ("receipts", "observations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("api_key_id")
