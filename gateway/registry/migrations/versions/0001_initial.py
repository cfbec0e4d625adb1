"""The registry: identities, certificates, stored responses, nonces, tokens, audit trail.

Revision ID: 0001_initial
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "identity",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.Column("manufacturer", sa.String(255), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("firmware_version", sa.String(255), nullable=True),
        sa.Column("firmware_digest", sa.String(64), nullable=True),
        sa.Column("birth_fingerprint", sa.String(64), nullable=True),
        sa.Column("role", sa.String(16), nullable=True),
        _time("last_seen_at", nullable=True),
        sa.Column("reattest_required", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_identity"),
        sa.UniqueConstraint("birth_fingerprint", name="uq_identity_birth_fingerprint"),
    )
    op.create_index("ix_identity_kind_state", "identity", ["kind", "state"])

    op.create_table(
        "certificate",
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("identity_id", sa.String(64), nullable=False),
        sa.Column("public_key_fingerprint", sa.String(64), nullable=False),
        _time("not_before"),
        _time("not_after"),
        _time("issued_at"),
        sa.Column("pem", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        _time("revoked_at", nullable=True),
        sa.Column("revocation_reason", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("serial", name="pk_certificate"),
        sa.UniqueConstraint(
            "public_key_fingerprint", name="uq_certificate_public_key_fingerprint"
        ),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identity.id"], name="fk_certificate_identity_id_identity"
        ),
    )
    op.create_index("ix_certificate_identity_id", "certificate", ["identity_id"])
    op.create_index("ix_certificate_status", "certificate", ["status"])

    op.create_table(
        "stored_response",
        sa.Column("identity_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        _time("at"),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("identity_id", "request_id", name="pk_stored_response"),
    )

    op.create_table(
        "nonce",
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        _time("issued_at"),
        _time("expires_at"),
        _time("used_at", nullable=True),
        sa.PrimaryKeyConstraint("value", name="pk_nonce"),
    )
    op.create_index("ix_nonce_expires_at", "nonce", ["expires_at"])

    op.create_table(
        "bootstrap_token",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        sa.Column("created_by", sa.String(255), nullable=False),
        _time("used_at", nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_bootstrap_token"),
    )

    op.create_table(
        "audit_event",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        _time("at"),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_event"),
    )
    op.create_index("ix_audit_event_subject", "audit_event", ["subject"])

    op.create_table(
        "audit_checkpoint",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        _time("at"),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_checkpoint"),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoint")
    op.drop_index("ix_audit_event_subject", table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_table("bootstrap_token")
    op.drop_index("ix_nonce_expires_at", table_name="nonce")
    op.drop_table("nonce")
    op.drop_table("stored_response")
    op.drop_index("ix_certificate_status", table_name="certificate")
    op.drop_index("ix_certificate_identity_id", table_name="certificate")
    op.drop_table("certificate")
    op.drop_index("ix_identity_kind_state", table_name="identity")
    op.drop_table("identity")
