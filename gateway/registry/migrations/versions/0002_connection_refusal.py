"""Connections the broker refused, aggregated per source, for the "unknown identities" view.

Revision ID: 0002_connection_refusal
Revises: 0001_initial
Create Date: 2026-03-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_connection_refusal"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "connection_refusal",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=True),
        sa.Column("cert_subject", sa.Text(), nullable=True),
        sa.Column("cert_issuer", sa.Text(), nullable=True),
        sa.Column("cert_fingerprint", sa.String(64), nullable=True),
        sa.Column("remote", sa.String(255), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_connection_refusal"),
    )
    op.create_index(
        "ix_connection_refusal_last_seen_key", "connection_refusal", ["last_seen", "key"]
    )


def downgrade() -> None:
    op.drop_index("ix_connection_refusal_last_seen_key", table_name="connection_refusal")
    op.drop_table("connection_refusal")
