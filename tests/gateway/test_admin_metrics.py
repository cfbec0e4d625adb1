"""The counters of a real gateway (embedded broker, TLS on loopback, SQLite registry) reach an
operator: a hostile enrollee's refusal shows in the admin API's ``metrics`` op and in the
metrics file `fleetgate metrics` reads."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from gateway_support import home_on_free_ports
from typer.testing import CliRunner

from gateway.admin import AdminClient, load_profile
from gateway.cli import app, operator
from gateway.config import load_settings
from gateway.enrollment.testing import hello_for
from gateway.metrics_export import metrics_path
from gateway.protocol import encode, topics
from gateway.service import Gateway
from pki.clock import SystemClock
from pki.factory import FactoryCA
from simulators.tls import server_auth_context

pytestmark = pytest.mark.broker

PASSPHRASE = b"operator profile passphrase"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    running = Gateway(load_settings(home_on_free_ports(tmp_path / "home")))
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


async def hostile_hello(gateway: Gateway) -> dict[str, Any]:
    """A device of a manufacturer the gateway does not trust says hello, over TLS."""
    stranger = FactoryCA.create("Stranger Devices", SystemClock()).mint("stranger-1", "gizmo")
    async with aiomqtt.Client(
        "127.0.0.1",
        gateway.ports.enrollment,
        identifier="stranger-1",
        tls_context=server_auth_context(gateway.ca_chain_pem()),
        timeout=5,
    ) as mqtt:
        await mqtt.subscribe(topics.enroll_response("stranger-1"), qos=1)
        await mqtt.publish(
            topics.enroll_request("stranger-1"), encode(hello_for(stranger)), qos=1
        )
        message = await asyncio.wait_for(mqtt.messages.__aiter__().__anext__(), 5)
    answer: dict[str, Any] = json.loads(bytes(message.payload))
    return answer


async def operator_client(gateway: Gateway, tmp_path: Path, name: str, role: str) -> AdminClient:
    passphrase_file = tmp_path / f"{name}.pass"
    passphrase_file.write_bytes(PASSPHRASE)
    out = tmp_path / f"{name}.profile.json"
    result = await asyncio.to_thread(
        CliRunner().invoke,
        operator.app,
        [
            "add", name, "--role", role,
            "--home", str(gateway.settings.home),
            "--out", str(out),
            "--passphrase-file", str(passphrase_file),
            "--port", str(gateway.ports.operational),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    client = AdminClient(load_profile(out), PASSPHRASE)
    client.start()
    return client


async def test_a_hostile_enrollee_is_counted_where_an_operator_can_see_it(
    gateway: Gateway, tmp_path: Path
) -> None:
    answer = await hostile_hello(gateway)
    assert (answer["type"], answer["reason"]) == ("error", "unknown_manufacturer")

    viewer = await operator_client(gateway, tmp_path, "vera", "viewer")
    try:
        result = await asyncio.to_thread(viewer.request, "metrics", None, timeout=10)
    finally:
        viewer.stop()
    assert result["node"] == socket.gethostname()  # the one gateway, not in a cluster
    assert result["enrollment"]["rejected.unknown_manufacturer"] == 1
    assert result["enrollment"]["requests.hello"] == 1
    assert result["broker"]["connected.enrollment"] >= 1  # the stranger's TLS session
    assert result["admin"]["requests"] >= 1
    assert isinstance(result["gateway"], dict)

    # What the gateway writes every 10 s (and at once here), as `fleetgate metrics` shows it.
    home = gateway.settings.home
    assert await asyncio.to_thread(gateway.metrics_file.write)
    shown = CliRunner().invoke(app, ["metrics", "--home", str(home), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["enrollment"]["rejected.unknown_manufacturer"] == 1
    assert data["up"] is True and data["node"] == result["node"]



async def test_a_running_gateway_writes_its_counters_and_says_when_it_stopped(
    tmp_path: Path,
) -> None:
    home = home_on_free_ports(tmp_path / "home")
    running = Gateway(load_settings(home))

    def shown() -> dict[str, Any]:
        result = CliRunner().invoke(app, ["metrics", "--home", str(home), "--json"])
        assert result.exit_code == 0, result.output
        loaded: dict[str, Any] = json.loads(result.output)
        return loaded

    await running.start()
    try:
        assert metrics_path(home).exists()  # written at start, not 10 s later
        assert shown()["up"] is True
    finally:
        await running.stop()
    assert shown()["up"] is False
