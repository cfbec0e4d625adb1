"""At most one active certificate per identity, kept by a partial unique index.

Revision ID: 0003_one_active_certificate
Revises: 0002_connection_refusal
Create Date: 2026-04-01 00:00:00

The store already supersedes an identity's active certificate in the transaction that adds the
new one; the index makes the database refuse a second one from any writer (another gateway on
the same PostgreSQL, a hand-made INSERT). Should a registry hold older duplicates, every active
certificate of an identity but its newest (issued last; ties: highest serial) is marked
superseded first, which is what recording the newest would have done; the index could not be
built otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_one_active_certificate"
down_revision: str | None = "0002_connection_refusal"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_certificate_identity_id_active"
ACTIVE_ONLY = "status = 'active'"

# Both databases compare these columns in stored order: issued_at as UTC text (SQLite) or
# timestamptz (PostgreSQL), serial as 40 zero-padded hex digits.
SUPERSEDE_OLDER_DUPLICATES = """
UPDATE certificate SET status = 'superseded'
WHERE status = 'active' AND EXISTS (
    SELECT 1 FROM certificate AS newer
    WHERE newer.identity_id = certificate.identity_id
      AND newer.status = 'active'
      AND (newer.issued_at > certificate.issued_at
           OR (newer.issued_at = certificate.issued_at AND newer.serial > certificate.serial))
)
"""


def upgrade() -> None:
    op.execute(sa.text(SUPERSEDE_OLDER_DUPLICATES))
    op.create_index(
        INDEX,
        "certificate",
        ["identity_id"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_ONLY),
        postgresql_where=sa.text(ACTIVE_ONLY),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="certificate")
