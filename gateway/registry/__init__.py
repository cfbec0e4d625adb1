"""The registry: every identity, certificate, nonce, token and audit record, in SQL.

``SqlStore(url)`` implements ``gateway.store.Store`` on SQLite (WAL; every decision synced to
disk before the call returns) or PostgreSQL, and upgrades the schema with the Alembic migrations
shipped in ``migrations/``.
"""

from gateway.registry.migrate import current_revision, head_revision, upgrade
from gateway.registry.sql_store import SqlStore
from gateway.registry.tables import METADATA

__all__ = ["METADATA", "SqlStore", "current_revision", "head_revision", "upgrade"]
