"""Fixtures of the scale-out tests: one throwaway PostgreSQL server for the session, a fresh
database per test, skips that say what is missing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from scaleout_kit import Cluster, ThrowawayPostgres, cluster_home, mosquitto_missing

from gateway.cluster.keeper import BrokerKeeper


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


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str, mosquitto: None) -> AsyncIterator[Cluster]:
    """A cluster home on a fresh database and its broker keeper, started; gateways are added
    by the test (``await cluster.add("gw-1")``) and all stopped after it."""
    settings = cluster_home(tmp_path / "home", database_url)
    keeper = BrokerKeeper(settings)
    await keeper.start()
    group = Cluster(settings, keeper)
    try:
        yield group
    finally:
        await group.stop()
