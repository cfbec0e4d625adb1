"""Refused connections are aggregated into rows for the console's "unknown identities": a
client retrying all day is one row, and clients that nothing identifies (no certificate, no
client id: what Mosquitto's log gives) are kept apart by the host they came from."""

from __future__ import annotations

from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import pytest

from gateway.broker.refusals import RefusedConnection, peer_address, remote_host
from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway
from gateway.store import refusal_key
from gateway.store_memory import MemoryStore

AT = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)


def refused(remote: str, *, fingerprint: str | None = None) -> RefusedConnection:
    return RefusedConnection(
        listener="operational",
        remote=remote,
        reason="no_client_certificate" if fingerprint is None else "unknown_ca",
        client_id=None,
        cert_subject=None,
        cert_issuer=None,
        cert_fingerprint=fingerprint,
        at=AT,
    )


@pytest.mark.parametrize(
    ("remote", "host"),
    [
        ("127.0.0.3:37619", "127.0.0.3"),
        ("gw.example:8883", "gw.example"),
        ("[2001:db8::7]:8883", "2001:db8::7"),
        ("[2001:db8::]:40000", "2001:db8::"),  # a host ending in "::" keeps its colons
        ("[::1]:8883", "::1"),
        # a bare address: Mosquitto names a handshake refused at once by host alone
        ("127.0.0.3", "127.0.0.3"),
        ("::1", "::1"),
        ("2001:db8::", "2001:db8::"),
        ("[::1]", "::1"),
        # unbracketed, an IPv6 address is whole: "2001:db8::7:8883" is an address itself
        ("2001:db8::7:8883", "2001:db8::7:8883"),
        # what is neither is returned as it is, never half-parsed
        ("[2001:db8::7", "[2001:db8::7"),
        ("[::1]:port", "[::1]:port"),
        ("[]:80", "[]:80"),
        ("host:", "host:"),
        (":80", ":80"),
        ("unknown", "unknown"),
    ],
)
def test_the_host_of_a_peer(remote: str, host: str) -> None:
    assert remote_host(remote) == host


@pytest.mark.parametrize("host", ["127.0.0.3", "::1", "2001:db8::", "2001:db8::7", "gw.example"])
def test_a_peer_written_with_its_port_gives_its_host_back(host: str) -> None:
    """Two sessions from one host on different ports are one host (else the embedded broker
    takes a device reconnecting from an IPv6 host ending in "::" for a clone)."""
    first, second = peer_address(host, 40000), peer_address(host, 40001)
    assert first != second
    assert remote_host(first) == remote_host(second) == host


def test_the_source_host_is_part_of_the_key_only_when_given() -> None:
    plain = refusal_key("operational", "no_client_certificate", None, None)
    assert plain == refusal_key("operational", "no_client_certificate", None, None, None)
    a = refusal_key("operational", "no_client_certificate", None, None, "10.0.0.1")
    b = refusal_key("operational", "no_client_certificate", None, None, "10.0.0.2")
    assert len({plain, a, b}) == 3
    with pytest.raises(ValueError):
        refusal_key("operational", "no_client_certificate", None, None, "a|b")


@pytest.mark.parametrize(
    "client_id",
    ["203.0.113.9|", "host=203.0.113.9|", "\xffhost=203.0.113.9|", "|203.0.113.9|", "203.0.113.9"],
)
def test_no_client_id_files_its_refusals_under_a_hosts_row(client_id: str) -> None:
    """The client id is the client's own choice: whatever it is, it cannot join the row of
    the certificate-less clients of a host."""
    hosts_row = refusal_key("operational", "no_client_certificate", None, None,
                            source_host="203.0.113.9")  # fmt: skip
    assert refusal_key("operational", "no_client_certificate", None, client_id) != hosts_row
    assert refusal_key("operational", "no_client_certificate", None, client_id,
                       source_host="203.0.113.9") != hosts_row  # fmt: skip


def test_rows_without_a_source_host_keep_their_key() -> None:
    """Registries aggregated before source hosts existed keep growing the same rows."""
    joined = b"operational|unknown_ca||ghost"
    assert refusal_key("operational", "unknown_ca", None, "ghost") == sha256(joined).hexdigest()


def test_anonymous_clients_get_a_row_per_host_and_a_certificate_one_row(tmp_path: Path) -> None:
    init_home(tmp_path)
    store = MemoryStore()
    gateway = Gateway(load_settings(tmp_path), store=store, broker_kind="embedded")
    for port in (1000, 1001, 1002):  # one host retrying from new ports: one row
        gateway._refused(refused(f"127.0.0.3:{port}"))
    gateway._refused(refused("127.0.0.4:2000"))
    for host in ("127.0.0.5", "127.0.0.6"):  # one rogue certificate from two hosts: one row
        gateway._refused(refused(f"{host}:3000", fingerprint="ab" * 32))
    gateway._flush_refusals()
    rows = sorted((r.reason, r.remote, r.count) for r in store.refusals())
    assert rows == [
        ("no_client_certificate", "127.0.0.3:1002", 3),
        ("no_client_certificate", "127.0.0.4:2000", 1),
        ("unknown_ca", "127.0.0.6:3000", 2),
    ]
