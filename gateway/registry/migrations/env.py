"""Alembic environment of the registry.

``gateway.registry.migrate`` runs it programmatically and hands over a connection through
``config.attributes["connection"]``; without one (an ``alembic`` command line pointed here for a
new revision) it connects to ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from gateway.registry.engine import create_registry_engine, writer
from gateway.registry.tables import METADATA

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        # SQLite alters tables by copying them; batch mode does that for later revisions.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured")
    engine = writer(create_registry_engine(url))
    try:
        with engine.connect() as fresh:
            _run(fresh)
            fresh.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the registry migrations run online only")
run_migrations_online()
