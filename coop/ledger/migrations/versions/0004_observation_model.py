"""observation model: the model a session ran, so its receipts are priced at that model's FLOPs

A coordinator may serve several models; a receipt must name the model its session ran, else a node
could claim a costlier model's FLOPs for the same blocks. Rows written before record none ("").

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-20 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_hash", sa.String(length=128), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_column("model_hash")
