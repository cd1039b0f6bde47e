"""node key: a ledger's node is (institution, node id), not its node id alone

Node ids are minted by each member and unique only within its institution: keyed by node id alone,
one institution's receipts for a node named like another's moved that node's span and last seen.
Rows kept so far keep their institution.

Revision ID: 0005
Revises: 0004
Create Date: 2027-02-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NODE_KEY = ("pk_nodes", ("institution", "node_id"))
NODE_ID_KEY = ("nodes_pkey", ("node_id",))  # 0001's key, as PostgreSQL names it


def upgrade() -> None:
    _rekey(NODE_ID_KEY, NODE_KEY)


def downgrade() -> None:
    """Fails where two institutions' nodes share an id: which one's row to keep is not for a migration to choose."""
    _rekey(NODE_KEY, NODE_ID_KEY)


def _rekey(old: tuple[str, tuple[str, ...]], new: tuple[str, tuple[str, ...]]) -> None:
    if op.get_context().dialect.name == "postgresql":
        op.drop_constraint(old[0], "nodes", type_="primary")
        op.create_primary_key(new[0], "nodes", list(new[1]))
        return
    # SQLite cannot change a primary key in place: the table is rebuilt as declared here, rows copied
    with op.batch_alter_table("nodes", copy_from=_nodes_table(*new), recreate="always"):
        pass


def _nodes_table(key_name: str, key: tuple[str, ...]) -> sa.Table:
    return sa.Table(
        "nodes",
        sa.MetaData(),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("institution", sa.String(length=128), nullable=False),
        sa.Column("start_block", sa.Integer(), nullable=False),
        sa.Column("end_block", sa.Integer(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["institution"], ["institutions.name"]),
        sa.PrimaryKeyConstraint(*key, name=key_name),
    )
