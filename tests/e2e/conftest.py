"""A real gateway (embedded broker by default, or Mosquitto; TLS on loopback, SQLite registry)
per test, or one per module for tests that run on the module's event loop."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tomli_w

from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.home import init_home
from gateway.service import Gateway
from pki.factory import FactoryCA
from simulators.factory import trust_factory


def write_home(home: Path, **overrides: Any) -> Settings:
    """A fresh home on free ports, with `overrides` merged into fleetgate.toml tables."""
    init_home(home)
    path = home / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["broker"]["enrollment_port"] = 0
    data["broker"]["operational_port"] = 0
    for table, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(table, {}).update(values)
        else:
            data[table] = values
    path.write_text(tomli_w.dumps(data))
    return load_settings(home)


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """`gateway, factory = await start_gateway(**settings_overrides)`; stopped after the test.

    ``broker_kind="mosquitto"`` runs the gateway on Mosquitto instead of the embedded broker
    (a keyword of its own: ``broker=`` would be the ``[broker]`` settings table)."""
    started: list[Gateway] = []

    async def start(
        broker_kind: str | None = None, **overrides: Any
    ) -> tuple[Gateway, FactoryCA]:
        settings = write_home(tmp_path / f"home{len(started)}", **overrides)
        factory = trust_factory(settings)
        gateway = Gateway(settings, broker_kind=broker_kind)
        started.append(gateway)  # stopped even if start fails halfway (a broker process)
        await gateway.start()
        return gateway, factory

    yield start
    for gateway in started:
        await gateway.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Gateway, FactoryCA]]:
    """One gateway with the default settings for a whole module, whose tests must then run on
    the module's event loop (``pytest.mark.asyncio(loop_scope="module")``)."""
    settings = write_home(tmp_path_factory.mktemp("module") / "home")
    factory = trust_factory(settings)
    gateway = Gateway(settings)
    try:
        await gateway.start()
        yield gateway, factory
    finally:
        await gateway.stop()
