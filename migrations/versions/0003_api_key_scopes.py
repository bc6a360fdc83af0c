"""api key scopes: what each tenant key may do (predict, read, train, admin)

Keys that exist before this revision keep every scope, so no working integration loses access.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 12:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: every scope a tenant key can hold (`service.domain.tenants.Scope`), sorted as the code stores them
ALL_SCOPES = ["admin", "predict", "read", "train"]


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scopes", sa.JSON(), nullable=True))
    api_keys = sa.table("api_keys", sa.column("scopes", sa.JSON()))
    op.execute(api_keys.update().values(scopes=ALL_SCOPES))
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("scopes", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("scopes")
