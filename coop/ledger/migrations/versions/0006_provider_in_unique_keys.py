"""provider in unique keys: an observation is one per (session, institution, node id), a receipt one per batch of it

Node ids are unique only within an institution: keyed by (session, node id), two institutions'
"gpu-0" in one session overwrote each other's observation, and one of them could not bill its work.
The provider joins both keys. Rows kept so far keep their provider.

Revision ID: 0006
Revises: 0005
Create Date: 2027-02-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Key = tuple[str, tuple[str, ...]]

OBSERVATION_KEY: Key = ("uq_observations_session_provider_node", ("session_id", "provider", "node_id"))
RECEIPT_KEY: Key = ("uq_receipts_session_provider_node_batch", ("session_id", "provider", "node_id", "batch"))
# before: 0001's unnamed key (as PostgreSQL names it; SQLite leaves it unnamed), and 0003's
OLD_OBSERVATION_KEY: Key = ("observations_session_id_node_id_key", ("session_id", "node_id"))
OLD_RECEIPT_KEY: Key = ("uq_receipts_session_node_batch", ("session_id", "node_id", "batch"))


def upgrade() -> None:
    _rekey_observations(OLD_OBSERVATION_KEY, OBSERVATION_KEY)
    _rekey_receipts(OLD_RECEIPT_KEY, RECEIPT_KEY)


def downgrade() -> None:
    """Fails where two institutions' nodes of one id served one session: which row to keep is not for a
    migration to choose."""
    _rekey_receipts(RECEIPT_KEY, OLD_RECEIPT_KEY)
    _rekey_observations(OBSERVATION_KEY, OLD_OBSERVATION_KEY)


def _rekey_receipts(old: Key, new: Key) -> None:
    with op.batch_alter_table("receipts", schema=None) as batch_op:
        batch_op.drop_constraint(old[0], type_="unique")
        batch_op.create_unique_constraint(new[0], list(new[1]))


def _rekey_observations(old: Key, new: Key) -> None:
    if op.get_context().dialect.name == "postgresql":
        op.drop_constraint(old[0], "observations", type_="unique")
        op.create_unique_constraint(new[0], "observations", list(new[1]))
        return
    # SQLite cannot drop 0001's unnamed key: the table is rebuilt as declared here, rows copied
    name = None if new == OLD_OBSERVATION_KEY else new[0]
    with op.batch_alter_table("observations", copy_from=_observations_table(name, new[1]), recreate="always"):
        pass


def _observations_table(key_name: str | None, key: tuple[str, ...]) -> sa.Table:
    return sa.Table(
        "observations",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("provider", sa.String(length=128), nullable=False),
        sa.Column("consumer", sa.String(length=128), nullable=False),
        sa.Column("start_block", sa.Integer(), nullable=False),
        sa.Column("end_block", sa.Integer(), nullable=False),
        sa.Column("prefill_tokens", sa.Integer(), nullable=False),
        sa.Column("decode_tokens", sa.Integer(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_id", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("model_hash", sa.String(length=128), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(*key, name=key_name),
    )
