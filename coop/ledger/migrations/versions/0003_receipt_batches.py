"""receipt batches: a node bills a session in numbered batches, each once

A receipt covers one batch of a session's steps on one node (`coop.node.receipt_batches`); the unique key
(session, node) becomes (session, node, batch). Receipts booked before are batch 0.

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch", sa.Integer(), nullable=False, server_default="0"))
        batch_op.drop_constraint("uq_receipts_session_node", type_="unique")
        batch_op.create_unique_constraint("uq_receipts_session_node_batch", ["session_id", "node_id", "batch"])


def downgrade() -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_constraint("uq_receipts_session_node_batch", type_="unique")
        batch_op.create_unique_constraint("uq_receipts_session_node", ["session_id", "node_id"])
        batch_op.drop_column("batch")
