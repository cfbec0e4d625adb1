"""An index on when each stored answer was given, for the retention sweep.

Revision ID: 0004_stored_response_at
Revises: 0003_one_active_certificate
Create Date: 2026-04-15 00:00:00

``gateway.retention`` deletes stored answers past the retry horizon, oldest first, a batch at a
time; without the index every batch would read the whole table (a renewal every 40 s per
device at 60 s certificates is ~2,160 rows a day each).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004_stored_response_at"
down_revision: str | None = "0003_one_active_certificate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_stored_response_at"


def upgrade() -> None:
    op.create_index(INDEX, "stored_response", ["at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="stored_response")
