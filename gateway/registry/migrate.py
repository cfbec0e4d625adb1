"""Bring a registry database to the newest schema with Alembic, without an alembic.ini.

The migrations ship inside the package (``gateway/registry/migrations``), so an installed
gateway can upgrade its own database at start-up.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, func, select

from gateway.registry.engine import writer

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current_revision", "head_revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = int.from_bytes(b"fg-migra")
"""PostgreSQL advisory lock held while one gateway migrates the schema."""


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    # Config values go through configparser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run every migration up to ``revision``; a database already there is left untouched."""
    with writer(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            # Gateways starting together against one database queue here (until the first
            # commits) instead of racing to create the same tables; the later ones then find
            # the schema current. SQLite's BEGIN IMMEDIATE serialises them already.
            connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        command.upgrade(alembic_config(connection), revision)
