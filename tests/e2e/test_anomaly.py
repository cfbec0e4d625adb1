"""Anomaly detection end to end: a real gateway with its behaviour watch (``gateway.watch``),
devices enrolled and online over TLS, and what an operator notices when one misbehaves: the
registry's state, the audit trail, the ``anomaly`` event, the broker diverting the device, and
``fleetgate device show``.

The watch evaluates every ``EVALUATE_SECONDS`` (5 s): a detection is carried out within one or
two of them. ``warmup_minutes = 1`` (the smallest) keeps the engine's first minutes short; the
detections tested here (probing, firmware, a request flood, a telemetry flood over a ceiling)
need no learned baseline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from test_enforcement import (
    _MISSING,
    Device,
    Peer,
    enroll,
    enrollment,
    observer,
    online,
    quarantine_in_force,
)
from test_enrollment import FIRMWARE, device, drive
from typer.testing import CliRunner

from gateway.anomaly.engine import RECHECK_UNKNOWN_SECONDS
from gateway.cli import app
from gateway.protocol import topics
from gateway.protocol.device import DeviceClient, Enrolled, Rejected, Send
from gateway.protocol.messages import Firmware
from gateway.protocol.topics import Channel
from gateway.service import Gateway, GatewayEvent
from gateway.store import AuditEntry, IdentityState
from gateway.watch import ACTOR, EVALUATE_SECONDS
from pki.clock import SystemClock
from simulators.factory import FIRMWARE_DIGEST

pytestmark = pytest.mark.broker

FAST = {"warmup_minutes": 1}
# Two evaluations and the time to carry a verdict out, on a shared machine.
DETECTED_WITHIN = 2 * EVALUATE_SECONDS + 3.0
# The engine believes "the registry does not hold it" this long after a device's hello, then
# asks again: what a device does before that is held to the ceilings of unregistered ones.
REGISTERED_AFTER = RECHECK_UNKNOWN_SECONDS + 0.5


class Events:
    """The gateway's events as a listener (the admin event stream's source) hears them."""

    def __init__(self, gateway: Gateway) -> None:
        self.seen: list[GatewayEvent] = []
        gateway.listeners.append(self.seen.append)

    def anomalies(self, subject: str | None = None) -> list[GatewayEvent]:
        found = [e for e in self.seen if e.kind == "anomaly"]
        return found if subject is None else [e for e in found if e.subject == subject]


async def until(
    condition: Callable[[], bool], what: str, within: float = DETECTED_WITHIN
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"{what} within {within:.0f} s"
        await asyncio.sleep(0.1)


def state_of(gateway: Gateway, identity: str) -> IdentityState | None:
    record = gateway.store.get_identity(identity)
    return record.state if record is not None else None


def anomaly_audit(gateway: Gateway, identity: str) -> list[AuditEntry]:
    return [
        r.entry
        for r in gateway.store.audit_records()
        if r.entry.subject == identity and r.entry.action == "anomaly"
    ]


async def probe_neighbour(bad: Peer, victim: Device) -> None:
    """Three attempts on another device's topics: each one denied by the broker."""
    for stolen in (
        topics.commands_filter(victim.id),
        topics.telemetry(victim.id),
        f"fg/v1/dev/{victim.id}/#",
    ):
        assert not await bad.subscribe(stolen), stolen


# -- probing: quarantined on its own, released by an operator ----------------------------------


async def test_a_device_probing_its_neighbours_is_quarantined_until_an_operator_releases_it(
    start_gateway,
) -> None:
    gateway, factory = await start_gateway(anomaly=FAST)
    events = Events(gateway)
    prober = await enroll(gateway, factory, "th-p001")
    neighbour = await enroll(gateway, factory, "th-n001")
    mine, theirs = topics.telemetry(prober.id), topics.telemetry(neighbour.id)
    async with observer(gateway) as watch, online(gateway, prober) as bad, online(
        gateway, neighbour
    ) as good:
        await bad.publish(mine, b"before")
        await watch.expect(mine, b"before")
        await probe_neighbour(bad, neighbour)

        await until(
            lambda: state_of(gateway, prober.id) is IdentityState.QUARANTINED,
            "the prober quarantined by the watch",
        )
        [verdict] = anomaly_audit(gateway, prober.id)
        assert verdict.actor == ACTOR and verdict.outcome == "quarantine"
        assert verdict.detail["detection"] == "probing"
        assert verdict.detail["rule"] == "probing"
        assert "3 denied attempts" in verdict.reasons[1]
        assert neighbour.id in verdict.reasons[1]  # the evidence names what it tried
        [quarantine] = [
            r.entry
            for r in gateway.store.audit_records()
            if r.entry.subject == prober.id and r.entry.action == "quarantine"
        ]
        assert quarantine.actor == ACTOR
        [event] = events.anomalies(prober.id)
        assert event.data["detection"] == "probing"
        assert event.data["action"] == "quarantine" and event.data["carried_out"] == "yes"

        # the broker diverts it; its neighbour carries on as before
        await quarantine_in_force(bad, watch, prober)
        await bad.publish(mine, b"while quarantined")
        await good.publish(theirs, b"untouched")
        await watch.expect(theirs, b"untouched")
        assert not watch.saw(mine, b"while quarantined")
        assert state_of(gateway, neighbour.id) is IdentityState.ACTIVE
        assert events.anomalies(neighbour.id) == []

        # an operator looks and releases it: active again, and its denials are forgotten
        await gateway.release(prober.id, actor="test:operator")
        await bad.publish(mine, b"released")
        await watch.expect(mine, b"released")
        await asyncio.sleep(EVALUATE_SECONDS + 1.0)  # at least one evaluation since
        assert state_of(gateway, prober.id) is IdentityState.ACTIVE
        assert len(events.anomalies(prober.id)) == 1
        assert not bad.lost.done()  # one connection throughout


# -- firmware ----------------------------------------------------------------------------------


async def test_a_renewal_reporting_other_firmware_quarantines_the_device(
    start_gateway,
) -> None:
    gateway, factory = await start_gateway(anomaly=FAST)
    events = Events(gateway)
    client = device(factory, "th-f001")
    enrolled = (await drive(client, gateway))[-1]
    assert isinstance(enrolled, Enrolled)
    await asyncio.sleep(REGISTERED_AFTER)  # a renewal comes long after the enrollment
    # the device now runs firmware it never attested, and says so at renewal
    client.firmware = Firmware(version="1.5.0", digest="c" * 64)
    renewed = (await drive(client, gateway, Channel.RENEW, first=client.renew()))[-1]
    assert isinstance(renewed, Enrolled) and renewed.renewal

    await until(
        lambda: state_of(gateway, client.device_id) is IdentityState.QUARANTINED,
        "the device quarantined for its firmware",
    )
    [verdict] = anomaly_audit(gateway, client.device_id)
    assert verdict.detail["detection"] == "firmware_change" and verdict.outcome == "quarantine"
    assert "1.5.0" in verdict.reasons[1] and FIRMWARE.version in verdict.reasons[1]
    [event] = events.anomalies(client.device_id)
    assert event.data["detection"] == "firmware_change" and event.data["carried_out"] == "yes"

    # what an operator reads in `fleetgate device show`
    runner = CliRunner()
    home = str(gateway.settings.home)
    shown = await asyncio.to_thread(
        runner.invoke, app, ["device", "show", client.device_id, "--home", home, "--json"]
    )
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["state"] == "quarantined"
    [detection] = data["detections"]
    assert detection["detection"] == "firmware_change"
    assert detection["action"] == "quarantine"
    assert "1.5.0" in detection["reason"]
    table = await asyncio.to_thread(
        runner.invoke, app, ["device", "show", client.device_id, "--home", home]
    )
    assert table.exit_code == 0, table.output
    # (the table is 80 columns wide here: its cells wrap)
    assert "detections (behaviour watch)" in table.output


async def test_a_device_refused_for_tampered_firmware_raises_an_alert(start_gateway) -> None:
    gateway, factory = await start_gateway(
        anomaly=FAST, policy={"firmware": {"TH-200": [FIRMWARE_DIGEST]}}
    )
    events = Events(gateway)
    tampered = Firmware(version=FIRMWARE.version, digest="0" * 64)
    client = DeviceClient(factory.mint("th-x001", "TH-200"), firmware=tampered, clock=SystemClock())
    events_seen = await drive(client, gateway, until=Rejected)
    assert events_seen[-1].reason == "firmware_not_allowed"

    await until(lambda: bool(events.anomalies(client.device_id)), "an anomaly event")
    [event] = events.anomalies(client.device_id)
    assert event.data["detection"] == "firmware_change"
    assert "allow-list" in event.data["reason"]
    # nothing to quarantine: the registry never held it
    assert state_of(gateway, client.device_id) is None
    [verdict] = anomaly_audit(gateway, client.device_id)
    assert verdict.detail["detection"] == "firmware_change"


# -- an enrollment flood -----------------------------------------------------------------------


async def test_a_flood_of_hellos_from_one_device_id_raises_an_alert(start_gateway) -> None:
    gateway, factory = await start_gateway(anomaly=FAST)
    events = Events(gateway)
    flooder = "th-h001"
    [hello] = [e for e in device(factory, flooder).start() if isinstance(e, Send)]
    async with observer(gateway) as watch, enrollment(gateway, flooder) as peer:
        for _ in range(45):
            await peer.publish(hello.topic, hello.payload)
        await peer.publish(hello.topic, b"marker")
        await watch.expect(hello.topic, b"marker")

    await until(lambda: bool(events.anomalies(flooder)), "an anomaly event about the flooder")
    [event] = events.anomalies(flooder)
    assert event.data["detection"] == "rate_spike"
    assert event.data["action"] == "alert"
    assert "registry does not hold" in event.data["reason"]
    assert state_of(gateway, flooder) is None
    # the gateway is none the worse: the next device enrolls
    assert (await enroll(gateway, factory, "th-h002")).enrolled.certificate is not None


# -- switched off ------------------------------------------------------------------------------


async def test_with_detection_disabled_nothing_is_detected(start_gateway) -> None:
    gateway, factory = await start_gateway(anomaly={"enabled": False})
    assert not gateway.watch.enabled
    events = Events(gateway)
    prober = await enroll(gateway, factory, "th-d001")
    neighbour = await enroll(gateway, factory, "th-d002")
    async with observer(gateway) as watch, online(gateway, prober) as bad:
        await probe_neighbour(bad, neighbour)
        await bad.publish(topics.telemetry(prober.id), b"still here")
        await watch.expect(topics.telemetry(prober.id), b"still here")
        await asyncio.sleep(EVALUATE_SECONDS + 1.0)
    assert state_of(gateway, prober.id) is IdentityState.ACTIVE
    assert events.anomalies() == []
    assert anomaly_audit(gateway, prober.id) == []


# -- Mosquitto ---------------------------------------------------------------------------------


@pytest.mark.skipif(_MISSING is not None, reason=f"Mosquitto is not installed ({_MISSING})")
async def test_a_telemetry_flood_on_mosquitto_is_found_through_the_gateways_subscription(
    start_gateway,
) -> None:
    """Mosquitto reports no publishes: the gateway's own subscription sees the device's
    telemetry. A registered device with no history and no peers is held to the ceiling
    (lowered here, and no grace after its connect, so that a short flood crosses it)."""
    gateway, factory = await start_gateway(
        broker_kind="mosquitto",
        anomaly={
            **FAST,
            "thresholds": {"max_messages_per_minute": 40, "grace_after_connect_seconds": 0},
        },
    )
    events = Events(gateway)
    flooder = await enroll(gateway, factory, "th-m001")
    quiet = await enroll(gateway, factory, "th-m002")
    async with observer(gateway) as watch, online(gateway, flooder) as loud, online(
        gateway, quiet
    ) as calm:
        await calm.publish(topics.telemetry(quiet.id), b"calm")
        await loud.publish(topics.telemetry(flooder.id), b"first")
        await asyncio.sleep(REGISTERED_AFTER)
        for index in range(200):
            await loud.publish(topics.telemetry(flooder.id), str(index).encode())
        await watch.expect(topics.telemetry(flooder.id), b"199")

        await until(lambda: bool(events.anomalies(flooder.id)), "an anomaly event on Mosquitto")
    [event, *_] = events.anomalies(flooder.id)
    assert event.data["detection"] == "rate_spike"
    assert "ceiling of 40 msg/min" in event.data["reason"]
    assert anomaly_audit(gateway, flooder.id)
    assert events.anomalies(quiet.id) == []

