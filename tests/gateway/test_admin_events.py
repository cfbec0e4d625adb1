"""Gateway events to operators: published on the loop whatever thread emitted them, notable
ones kept for the attention view."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.admin.events import EventRelay, EventView, issued_certificate_data
from gateway.protocol.codec import encode
from gateway.protocol.messages import IssuedCertificate, Pending
from gateway.service import GatewayEvent
from pki.clock import FakeClock
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


class Recorder:
    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.threads: list[int] = []

    async def __call__(self, payload: bytes) -> None:
        self.threads.append(threading.get_ident())
        self.payloads.append(payload)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_event_emitted_on_the_loop_is_published() -> None:
    recorder = Recorder()
    relay = EventRelay(recorder)
    relay(GatewayEvent("connected", "dev-1", AT, {"remote": "10.0.0.1:4000"}))
    await _settle()
    [payload] = recorder.payloads
    assert json.loads(payload) == {
        "v": 1,
        "kind": "connected",
        "subject": "dev-1",
        "at": AT.isoformat(),
        "data": {"remote": "10.0.0.1:4000"},
    }
    assert relay.metrics["published"] == 1


async def test_an_event_nobody_listens_to_is_neither_encoded_nor_sent() -> None:
    recorder = Recorder()
    listening = False
    relay = EventRelay(recorder, heard=lambda: listening)
    relay(GatewayEvent("connected", "dev-1", AT, {}))
    relay(GatewayEvent("clone", "dev-2", AT, {}))
    await _settle()
    assert recorder.payloads == []
    assert relay.metrics["unheard"] == 2
    assert [e.subject for e in relay.recent()] == ["dev-2"]  # still kept for the attention view
    listening = True  # a console subscribed
    relay(GatewayEvent("connected", "dev-3", AT, {}))
    await _settle()
    assert [json.loads(p)["subject"] for p in recorder.payloads] == ["dev-3"]


async def test_when_the_audience_cannot_be_told_the_event_is_sent() -> None:
    recorder = Recorder()

    def broken() -> bool:
        raise RuntimeError("broker stopping")

    relay = EventRelay(recorder, heard=broken)
    relay(GatewayEvent("connected", "dev-1", AT, {}))
    await _settle()
    assert len(recorder.payloads) == 1 and relay.metrics["published"] == 1


async def test_an_event_emitted_from_another_thread_is_published_on_the_loop() -> None:
    recorder = Recorder()
    relay = EventRelay(recorder)
    relay.bind(asyncio.get_running_loop())
    worker = threading.Thread(target=relay, args=(GatewayEvent("clone", "dev-2", AT),))
    worker.start()
    worker.join()
    await _settle()
    assert len(recorder.payloads) == 1
    assert recorder.threads == [threading.get_ident()]  # the loop's thread, not the worker's


def test_an_event_from_a_thread_before_any_loop_is_known_is_dropped_and_counted() -> None:
    recorder = Recorder()
    relay = EventRelay(recorder)
    relay(GatewayEvent("clone", "dev-2", AT))
    assert relay.metrics["dropped.no_loop"] == 1
    assert [e.kind for e in relay.recent()] == ["clone"]  # still shown in attention


async def test_a_failing_publish_is_counted_and_never_raised() -> None:
    async def broken(payload: bytes) -> None:
        raise ConnectionError("broker gone")

    relay = EventRelay(broken)
    relay(GatewayEvent("connected", "dev-1", AT))
    await _settle()
    assert relay.metrics["errors.publish"] == 1


def test_notable_events_are_kept_newest_first_and_bounded() -> None:
    relay = EventRelay(None, keep=2)
    relay(GatewayEvent("clone", "dev-1", AT))
    relay(GatewayEvent("connected", "dev-9", AT))
    relay(GatewayEvent("anomaly", "dev-2", AT))
    relay(GatewayEvent("clone", "dev-3", AT))
    kept = [(e.kind, e.subject) for e in relay.recent()]
    assert kept == [("clone", "dev-3"), ("anomaly", "dev-2")]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": ""}, ValueError),
        ({"subject": 5}, TypeError),
        ({"at": datetime(2026, 1, 1)}, ValueError),  # naive
    ],
)
def test_an_event_view_validates_itself(kwargs: dict[str, object], error: type) -> None:
    fields: dict[str, object] = {"kind": "connected", "subject": "dev-1", "at": AT, **kwargs}
    with pytest.raises(error):
        EventView(**fields)  # type: ignore[arg-type]


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventRelay(None, keep=0)


def test_a_certificate_issued_event_carries_the_new_expiry_and_serial() -> None:
    """Read from the answer the device gets, so a console updates the row in place."""
    clock = FakeClock(AT)
    ca = make_issuing_ca(clock)
    template = LeafTemplate(
        kind=IdentityKind.DEVICE, name="dev-1", trust_domain="fleet.test",
        lifetime=timedelta(hours=5),
    )
    leaf = Issuer(ca, clock).issue(template, LocalSigner.generate().public_key())
    answer = IssuedCertificate(
        "req-1",
        leaf.public_bytes(Encoding.DER),
        (ca.certificate.public_bytes(Encoding.DER),),
        int(leaf.not_valid_after_utc.timestamp()),
        int(AT.timestamp()) + 3600,
    )
    data = issued_certificate_data(encode(answer))
    assert data == {
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "serial": f"{leaf.serial_number:x}",
    }
    assert datetime.fromisoformat(data["not_after"]) > AT + timedelta(hours=4)


@pytest.mark.parametrize(
    "payload",
    [
        encode(Pending("req-1", 30)),  # a stored answer that is no certificate
        b"{not json",
        encode(IssuedCertificate("req-1", b"\0\0\0", (b"\0\0\0",), 1, 1)),  # not DER
        None,
    ],
)
def test_an_answer_without_a_readable_certificate_gives_no_event_data(payload: object) -> None:
    assert issued_certificate_data(payload) == {}
