"""The admin API end to end: a real gateway (embedded broker, TLS on loopback, SQLite registry),
operators added with `fleetgate operator add`, the client library over mutual TLS, and
simulated sensors whose sessions the operators' decisions reach.

The gateway runs on the test's event loop, so every blocking client call goes to a thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from typer.testing import CliRunner

from gateway.admin import AdminClient, AdminError, AdminService, attach_admin, load_profile
from gateway.admin.client import tls_context
from gateway.cli import operator
from gateway.service import Gateway
from gateway.store import IdentityState
from pki.factory import FactoryCA
from simulators.device import SensorOptions, SimulatedSensor

pytestmark = pytest.mark.broker

PASSPHRASE = b"operator profile passphrase"


@pytest.fixture
def admin_gateway(start_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``start_gateway`` with the admin API attached before the gateway starts (attaching is
    idempotent, so this holds whether or not the gateway attaches it by itself)."""
    original = Gateway.start

    async def start_with_admin(self: Gateway) -> None:
        attach_admin(self)
        await original(self)

    monkeypatch.setattr(Gateway, "start", start_with_admin)

    async def start() -> tuple[Gateway, FactoryCA, AdminService]:
        gateway, factory = await start_gateway()
        return gateway, factory, attach_admin(gateway)

    return start


class Console:
    """One operator's client, with what it heard."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.statuses: list[str] = []
        self.ready = threading.Event()

    async def ask(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.request, op, args, timeout=10)

    async def refused(self, op: str, args: dict[str, Any] | None = None) -> AdminError:
        with pytest.raises(AdminError) as caught:
            await self.ask(op, args)
        return caught.value


async def add_operator(gateway: Gateway, tmp_path: Path, name: str, role: str) -> Console:
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
    )
    assert result.exit_code == 0, result.output
    console: Console

    def on_connection(status: str) -> None:
        console.statuses.append(status)
        if status == "connected":
            console.ready.set()

    client = AdminClient(
        load_profile(out),
        PASSPHRASE,
        on_event=lambda event: console.events.append(event),
        on_connection=on_connection,
    )
    console = Console(client)
    client.start()
    assert await asyncio.to_thread(console.ready.wait, 10), console.statuses
    return console


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def sensor(gateway: Gateway, factory: FactoryCA, serial: str) -> SimulatedSensor:
    options = SensorOptions(
        host="127.0.0.1",
        enrollment_port=gateway.ports.enrollment,
        operational_port=gateway.ports.operational,
        ca_pem=gateway.ca_chain_pem(),
        telemetry_interval=0.1,
        response_timeout=5.0,
        min_backoff=0.2,
        max_backoff=0.5,
    )
    return SimulatedSensor(factory.mint(serial, "TH-200"), options, asyncio.Semaphore(8))


def online(gateway: Gateway, device_id: str) -> bool:
    assert gateway.broker is not None
    principal = gateway.broker.connected().get(device_id)
    return principal is not None and principal.kind == "device"


async def run_sensors(
    gateway: Gateway, factory: FactoryCA, serials: list[str]
) -> tuple[dict[str, SimulatedSensor], asyncio.Event, Callable[[], Awaitable[None]]]:
    stop = asyncio.Event()
    sensors = {s: sensor(gateway, factory, s) for s in serials}
    tasks = [asyncio.create_task(s.run(stop)) for s in sensors.values()]

    async def finish() -> None:
        stop.set()
        # A revoked sensor may sit in a connection attempt the broker will never accept.
        _, stuck = await asyncio.wait(tasks, timeout=1.0)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    await eventually(lambda: all(online(gateway, s) for s in serials))
    return sensors, stop, finish


async def test_operators_see_the_fleet_and_their_decisions_reach_the_broker(
    admin_gateway: Any, tmp_path: Path
) -> None:
    gateway, factory, service = await admin_gateway()
    vera = await add_operator(gateway, tmp_path, "vera", "viewer")
    otto = await add_operator(gateway, tmp_path, "otto", "operator")
    ada = await add_operator(gateway, tmp_path, "ada", "admin")
    sensors, _, finish = await run_sensors(gateway, factory, ["th-a01", "th-a02"])
    try:
        assert await vera.ask("whoami") == {"operator": "vera", "role": "viewer"}
        # The fleet as each console lists it: live sessions, certificates, operators.
        for console in (vera, otto, ada):
            listed = await console.ask("list_identities", {"kind": "device"})
            rows = {r["id"]: r for r in listed["identities"]}
            assert set(rows) == {"th-a01", "th-a02"} and listed["total"] == 2
            assert all(r["connected"] and r["state"] == "active" for r in rows.values())
            assert all(r["cert_not_after"] and r["model"] == "TH-200" for r in rows.values())
        operators = (await vera.ask("operators"))["operators"]
        assert {(o["id"], o["role"], o["connected"]) for o in operators} == {
            ("vera", "viewer", True),
            ("otto", "operator", True),
            ("ada", "admin", True),
        }
        # Events arrive as they happen: the sensors' sessions opened after the consoles.
        await eventually(
            lambda: {"th-a01", "th-a02"}
            <= {e["subject"] for e in ada.events if e["kind"] == "connected"}
        )

        # An operator quarantines a device: by the reply, the broker enforces it.
        result = await otto.ask("quarantine", {"ids": ["th-a01"], "reason": "odd readings"})
        assert result["results"] == [{"id": "th-a01", "ok": True, "state": "quarantined"}]
        await asyncio.sleep(0.3)  # let telemetry routed before the reply drain
        counted = service.telemetry.rate("th-a01").total
        published = sensors["th-a01"].outcome.telemetry
        control = service.telemetry.rate("th-a02").total
        await asyncio.sleep(1.0)
        # It is still connected and still publishing, but its telemetry no longer gets through;
        # the other device's does.
        assert online(gateway, "th-a01")
        assert sensors["th-a01"].outcome.telemetry > published + 3
        assert service.telemetry.rate("th-a01").total == counted
        assert service.telemetry.rate("th-a02").total > control + 3
        await eventually(
            lambda: any(
                e["kind"] == "state_changed"
                and e["subject"] == "th-a01"
                and e["data"]["state"] == "quarantined"
                for e in vera.events
            )
        )

        # A viewer's revoke is refused, audited, and changes nothing.
        error = await vera.refused("revoke", {"ids": ["th-a02"], "reason": "try"})
        assert error.reason == "forbidden"
        denied = [
            r.entry for r in gateway.store.audit_records()
            if r.entry.actor == "operator:vera" and r.entry.action == "revoke"
        ]
        assert [(e.subject, e.outcome) for e in denied] == [("th-a02", "rejected")]
        assert gateway.store.get_identity("th-a02").state is IdentityState.ACTIVE
        assert online(gateway, "th-a02")

        # An admin's revoke cuts the device off, for good.
        result = await ada.ask("revoke", {"ids": ["th-a02"], "reason": "stolen"})
        assert result["results"] == [{"id": "th-a02", "ok": True, "state": "revoked"}]
        await eventually(lambda: not online(gateway, "th-a02"))
        await asyncio.sleep(0.5)  # it keeps trying to come back
        assert not online(gateway, "th-a02")
        assert sensors["th-a02"].outcome.cut >= 1

        # The device detail and the trail tell the story.
        detail = await vera.ask("get_identity", {"id": "th-a01"})
        assert detail["state"] == "quarantined" and detail["connected"] is True
        assert detail["telemetry"]["total"] == counted > 0
        assert sum(detail["telemetry"]["per_minute"]) == counted
        assert detail["history"][0]["action"] == "quarantine"
        assert detail["history"][0]["actor"] == "operator:otto"
        assert detail["certificates"][0]["san"] == [
            f"URI:spiffe://{gateway.settings.trust_domain}/device/th-a01"
        ]
        trail = await vera.ask("audit", {"actor": "operator:ada"})
        assert [r["action"] for r in trail["records"]] == ["revoke"]
        assert trail["verified"]["ok"] is True
        attention = await vera.ask("attention")
        assert attention["quarantined"] == ["th-a01"]
    finally:
        await finish()
        for console in (vera, otto, ada):
            console.client.stop()


async def test_a_revoked_operator_is_cut_off_at_once(admin_gateway: Any, tmp_path: Path) -> None:
    gateway, _, _ = await admin_gateway()
    ada = await add_operator(gateway, tmp_path, "ada", "admin")
    otto = await add_operator(gateway, tmp_path, "otto", "operator")
    try:
        assert (await ada.ask("set_role", {"name": "otto", "role": "viewer"}))["role"] == "viewer"
        assert (await otto.ask("whoami"))["role"] == "viewer"
        result = await ada.ask("revoke_operator", {"name": "otto", "reason": "left"})
        assert result == {"name": "otto", "state": "revoked"}
        await eventually(lambda: any(s.startswith("disconnected") for s in otto.statuses))
        assert not online(gateway, "otto")
        with pytest.raises(AdminError) as caught:
            await asyncio.to_thread(otto.client.request, "whoami", timeout=0.5)
        assert caught.value.reason in ("timeout", "connection_lost")
    finally:
        ada.client.stop()
        otto.client.stop()


async def test_an_operator_hears_only_its_own_replies_and_bad_input_is_answered(
    admin_gateway: Any, tmp_path: Path
) -> None:
    gateway, _, service = await admin_gateway()
    await add_operator(gateway, tmp_path, "ada", "admin")
    otto = await add_operator(gateway, tmp_path, "otto", "operator")
    otto.client.stop()  # the raw session below takes its client id
    profile = load_profile(tmp_path / "otto.profile.json")
    async with aiomqtt.Client(
        "127.0.0.1",
        gateway.ports.operational,
        identifier="otto",
        tls_context=tls_context(profile, PASSPHRASE),
        timeout=5,
    ) as mqtt:
        # Another operator's replies and requests are not for otto.
        assert (await mqtt.subscribe("fg/v1/admin/ada/resp", qos=1))[0].value == 0x80
        assert (await mqtt.subscribe("fg/v1/admin/#", qos=1))[0].value == 0x80
        assert (await mqtt.subscribe("fg/v1/admin/otto/resp", qos=1))[0].value == 1
        messages = mqtt.messages.__aiter__()
        # A request published on someone else's topic never reaches the gateway.
        await mqtt.publish("fg/v1/admin/ada/req", b'{"v":1,"id":"x","op":"whoami"}', qos=1)
        for payload, reason in (
            (b"{broken", "malformed"),
            (b'{"v":1,"id":"r-2","op":"teleport"}', "unknown_op"),
            (b'{"v":1,"id":"r-3","op":"revoke","args":{"ids":["x"],"reason":"r"}}', "forbidden"),
        ):
            await mqtt.publish("fg/v1/admin/otto/req", payload, qos=1)
            message = await asyncio.wait_for(messages.__anext__(), 5)
            assert str(message.topic) == "fg/v1/admin/otto/resp"
            body = json.loads(bytes(message.payload))
            assert body["ok"] is False and body["error"]["reason"] == reason
        await mqtt.publish("fg/v1/admin/otto/req", b'{"v":1,"id":"r-4","op":"whoami"}', qos=1)
        message = await asyncio.wait_for(messages.__anext__(), 5)
        answer = json.loads(bytes(message.payload))
        assert answer["result"] == {"operator": "otto", "role": "operator"}
    assert service.metrics["rejected.malformed"] == 1
    assert service.metrics["requests"] == 4  # the request on ada's topic was dropped
