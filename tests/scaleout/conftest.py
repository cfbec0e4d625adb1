"""Fixtures of the scale-out tests: one throwaway PostgreSQL server for the session, a fresh
database per test, skips that say what is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scaleout_kit import ThrowawayPostgres, mosquitto_missing


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres.provide() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


@pytest.fixture
def database_url(postgres: ThrowawayPostgres) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped after the test."""
    url, name = postgres.fresh_database()
    yield url
    postgres.drop_database(name)


@pytest.fixture
def mosquitto() -> None:
    reason = mosquitto_missing()
    if reason is not None:
        pytest.skip(reason)
