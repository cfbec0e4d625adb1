"""A real gateway per test (embedded broker unless asked; TLS on loopback, SQLite registry),
with the simulated manufacturer trusted and its firmware on the allow-list."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.bench.home import make_bench_home
from gateway.service import Gateway
from pki.factory import FactoryCA
from simulators.factory import load_or_create_factory

GatewayFactory = Callable[..., Any]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """`gateway, factory = await start_gateway(broker="embedded")`; stopped after the test."""
    started: list[Gateway] = []

    async def start(broker: str = "embedded") -> tuple[Gateway, FactoryCA]:
        settings = make_bench_home(tmp_path / f"home{len(started)}", broker=broker)
        gateway = Gateway(settings)
        started.append(gateway)  # stopped even if start fails halfway (a broker process)
        await gateway.start()
        return gateway, load_or_create_factory(settings.home / "factory")

    yield start
    for gateway in started:
        await gateway.stop()
