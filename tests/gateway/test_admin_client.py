"""The client library's own behaviour, and the gateway-side plumbing, without a broker:
profiles, passphrases, timeouts, the admin worker and ``attach_admin``."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.admin import (
    AdminClient,
    AdminError,
    AdminService,
    Profile,
    ProfileError,
    attach_admin,
    load_profile,
)
from gateway.admin.attach import TELEMETRY_FILTER, AdminDispatcher
from gateway.admin.profile import FORMAT, MAX_PROFILE_BYTES, parse_profile
from gateway.admin.wire import REQUEST_FILTER, encode_request
from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway
from gateway.store_memory import MemoryStore
from gateway.transport import Outgoing
from pki.clock import SystemClock
from pki.issue import Issuer
from pki.keys import LocalSigner, encrypt_private_key
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

PASSPHRASE = b"correct horse battery"


def _pem(cert: object) -> bytes:
    return cert.public_bytes(Encoding.PEM)  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def profile() -> Profile:
    clock = SystemClock()
    ca = make_issuing_ca(clock)
    key = LocalSigner.generate()
    cert = Issuer(ca, clock).issue(
        LeafTemplate(
            kind=IdentityKind.OPERATOR,
            name="alice",
            trust_domain="fleet.test",
            lifetime=timedelta(hours=1),
        ),
        key.public_key(),
    )
    return Profile(
        name="alice",
        host="127.0.0.1",
        port=8884,
        ca_pem=_pem(ca.certificate) + _pem(ca.chain[0]),
        certificate_pem=_pem(cert) + _pem(ca.certificate),
        encrypted_key_pem=encrypt_private_key(key, PASSPHRASE),
    )


# -- profiles -------------------------------------------------------------------------------


def test_a_profile_round_trips_through_its_file(profile: Profile, tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    path.write_bytes(profile.to_json())
    assert load_profile(path) == profile
    assert json.loads(path.read_bytes())["format"] == FORMAT


def _profile_json(profile: Profile, **changes: object) -> bytes:
    data = json.loads(profile.to_json())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"format": "something-else"}, "profile_malformed"),
        ({"version": 2}, "profile_malformed"),
        ({"name": "a/b"}, "profile_invalid_field"),
        ({"name": None}, "profile_invalid_field"),
        ({"host": ""}, "profile_invalid_field"),
        ({"host": 5}, "profile_invalid_field"),
        ({"port": 0}, "profile_invalid_field"),
        ({"port": "8884"}, "profile_invalid_field"),
        ({"port": True}, "profile_invalid_field"),
        ({"ca_pem": "not a certificate"}, "profile_invalid_field"),
        ({"certificate_pem": 12}, "profile_invalid_field"),
        ({"certificate_pem": "é"}, "profile_invalid_field"),
        ({"encrypted_key_pem": "-----BEGIN PRIVATE KEY-----"}, "profile_invalid_field"),
    ],
)
def test_a_damaged_profile_is_refused_with_its_reason(
    profile: Profile, changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profile(_profile_json(profile, **changes))
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "data", [b"{nope", b"[]", b"\xff", b" " * (MAX_PROFILE_BYTES + 1)]
)
def test_a_file_that_is_no_profile_is_malformed(data: bytes) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profile(data)
    assert caught.value.reason == "profile_malformed"


def test_a_missing_profile_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile(tmp_path / "nowhere.json")
    assert caught.value.reason == "profile_unreadable"


# -- the client -----------------------------------------------------------------------------


def test_a_wrong_passphrase_is_refused_before_any_connection(profile: Profile) -> None:
    with pytest.raises(AdminError) as caught:
        AdminClient(profile, b"not it")
    assert caught.value.reason == "wrong_passphrase"


def test_a_key_that_does_not_match_the_certificate_is_refused(profile: Profile) -> None:
    other = encrypt_private_key(LocalSigner.generate(), PASSPHRASE)
    mismatched = Profile(**{**profile.__dict__, "encrypted_key_pem": other})
    with pytest.raises(AdminError) as caught:
        AdminClient(mismatched, PASSPHRASE)
    assert caught.value.reason == "profile_invalid_field"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_a_gateway_requests_time_out_and_the_state_is_reported(
    profile: Profile,
) -> None:
    statuses: list[str] = []
    unreachable = Profile(**{**profile.__dict__, "port": _closed_port()})
    client = AdminClient(unreachable, PASSPHRASE, on_connection=statuses.append)
    client.start()
    try:
        with pytest.raises(AdminError) as caught:
            client.request("whoami", timeout=0.3)
        assert caught.value.reason == "timeout"
        outcome: list[tuple[object, AdminError | None]] = []
        done = threading.Event()

        def callback(result: object, error: AdminError | None) -> None:
            outcome.append((result, error))
            done.set()

        client.request_async("list_identities", {}, callback, timeout=0.2)
        assert done.wait(3)
        assert outcome[0][0] is None and outcome[0][1] is not None
        assert outcome[0][1].reason == "timeout"
    finally:
        client.stop()
    assert statuses[0] == "connecting"
    assert any(s.startswith("disconnected: ") for s in statuses[1:])
    assert not client.connected


def test_requests_waiting_at_stop_fail_with_stopped(profile: Profile) -> None:
    client = AdminClient(profile, PASSPHRASE)
    errors: list[AdminError | None] = []
    client.request_async("whoami", None, lambda result, error: errors.append(error))
    client.stop()
    assert [e.reason for e in errors if e is not None] == ["stopped"]
    with pytest.raises(AdminError) as caught:
        client.request_async("whoami")
    assert caught.value.reason == "stopped"


def test_a_request_that_cannot_be_encoded_is_refused_in_the_callers_thread(
    profile: Profile,
) -> None:
    client = AdminClient(profile, PASSPHRASE)
    with pytest.raises(ValueError):
        client.request_async("")
    with pytest.raises(TypeError):
        client.request_async("whoami", {"when": object()})
    client.stop()


# -- the admin worker ---------------------------------------------------------------------


async def test_requests_are_answered_in_order_and_a_full_queue_answers_busy() -> None:
    release = threading.Event()
    published: list[Outgoing] = []

    def handle(topic: str, payload: bytes) -> list[Outgoing]:
        release.wait(5)
        return [Outgoing("fg/v1/admin/ada/resp", payload)]

    async def publish(message: Outgoing) -> None:
        published.append(message)

    dispatcher = AdminDispatcher(handle, publish, max_queued=2)
    topic = "fg/v1/admin/ada/req"
    assert dispatcher.accept(topic, encode_request("r-1", "whoami")) == []
    assert dispatcher.accept(topic, encode_request("r-2", "whoami")) == []
    [busy] = dispatcher.accept(topic, encode_request("r-3", "whoami"))
    assert busy.topic == "fg/v1/admin/ada/resp"
    body = json.loads(busy.payload)
    assert body["id"] == "r-3" and body["error"]["reason"] == "busy"
    assert dispatcher.accept("fg/v1/admin/events", b"{}") == []
    release.set()
    for _ in range(100):
        if len(published) == 2:
            break
        await asyncio.sleep(0.02)
    assert [json.loads(m.payload)["id"] for m in published] == ["r-1", "r-2"]


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    init_home(tmp_path / "gw", passphrase=b"ca passphrase")
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "ca passphrase")
    return Gateway(load_settings(tmp_path / "gw"), store=MemoryStore())


def test_attach_adds_the_routes_and_the_listener_once(gateway: Gateway) -> None:
    service = attach_admin(gateway)
    assert isinstance(service, AdminService)
    assert attach_admin(gateway) is service
    admin = [r for r in gateway.routes if r.topic_filter in (REQUEST_FILTER, TELEMETRY_FILTER)]
    assert [(r.topic_filter, r.inline) for r in admin] == [
        (REQUEST_FILTER, True),
        (TELEMETRY_FILTER, True),
    ]
    assert gateway.listeners.count(service.events) == 1
    # Telemetry on the route is counted for the device detail view.
    admin[1].handler("fg/v1/dev/dev-1/telemetry", b"{}")
    assert service.telemetry.rate("dev-1").total == 1


class _StartedGateway:
    """What attach_admin sees of a gateway that started without the admin API."""

    def __init__(self) -> None:
        self.transport = object()
        self.routes: list[object] = []
        self.listeners: list[object] = []


def test_attach_after_start_is_refused() -> None:
    started = _StartedGateway()
    with pytest.raises(RuntimeError):
        attach_admin(started)  # type: ignore[arg-type]
    assert started.routes == [] and started.listeners == []
