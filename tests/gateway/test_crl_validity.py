"""Periodic jobs of a gateway. The CRL's nextUpdate comes from fleetgate.toml ([ca]
crl_validity_hours), and the gateway re-signs it long before a broker would refuse everyone
for an expired CRL: on a managed Mosquitto, the periodic job writes the new CRL and reloads
the broker. The leader sweeps what the protocol no longer needs from the registry."""

from __future__ import annotations

import asyncio
import socket
import ssl
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from gateway_support import device_context, home_on_free_ports, mosquitto_missing

from gateway import retention
from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway
from gateway.store_memory import MemoryStore

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


def gateway_with(home: Path, crl_line: str | None) -> Gateway:
    init_home(home)
    if crl_line is not None:
        config = home / "fleetgate.toml"
        config.write_text(config.read_text().replace("crl_validity_hours = 24", crl_line))
    return Gateway(load_settings(home), store=MemoryStore(), broker_kind="embedded")


def next_update_after_this_update(gateway: Gateway) -> timedelta:
    crl = x509.load_pem_x509_crl(gateway.crl_pem())
    assert crl.next_update_utc is not None
    return crl.next_update_utc - crl.last_update_utc


def test_the_crl_lasts_a_day_by_default_and_is_resigned_hourly(tmp_path: Path) -> None:
    gateway = gateway_with(tmp_path, None)
    assert next_update_after_this_update(gateway) == timedelta(hours=24)
    assert gateway.crl_refresh_seconds == 3600


def test_a_short_crl_validity_is_honoured_and_resigned_at_a_quarter_of_it(
    tmp_path: Path,
) -> None:
    gateway = gateway_with(tmp_path, "crl_validity_hours = 2")
    assert next_update_after_this_update(gateway) == timedelta(hours=2)
    assert gateway.crl_refresh_seconds == 30 * 60


def _first_answer(port: int, tls: ssl.SSLContext, client_id: str) -> bytes:
    """The broker's first bytes after an MQTT 3.1.1 CONNECT (b"" when it closed instead)."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        conn.sendall(bytes((0x10, len(body))) + body)
        return conn.recv(4)


def next_update_of(path: Path) -> datetime:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.next_update_utc is not None
    return crl.next_update_utc


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_missing() is not None, reason="Mosquitto is not installed")
async def test_the_crl_job_gives_mosquitto_a_later_crl_and_devices_still_get_in(
    tmp_path: Path,
) -> None:
    home_on_free_ports(tmp_path)
    gateway = Gateway(load_settings(tmp_path), store=MemoryStore(), broker_kind="mosquitto")
    await gateway.start()
    try:
        crl_file = tmp_path / "mosquitto" / "crl.pem"
        first = next_update_of(crl_file)
        port = gateway.ports.operational
        tls = device_context(gateway, "th-crl1")
        assert await asyncio.to_thread(_first_answer, port, tls, "th-crl1") == CONNACK_ACCEPTED
        await asyncio.sleep(1.1)  # a CRL's times are in whole seconds
        log = tmp_path / "mosquitto" / "mosquitto.log"
        reloads = log.read_text().count("Reloading config.")
        await gateway._refresh_crl_if_leading()  # what the periodic job runs
        assert next_update_of(crl_file) > first
        assert log.read_text().count("Reloading config.") == reloads + 1
        # Mosquitto reloaded it and still admits a valid device (an expired or unreadable CRL
        # would turn every certificate away)
        assert await asyncio.to_thread(_first_answer, port, tls, "th-crl1") == CONNACK_ACCEPTED
    finally:
        await gateway.stop()


def test_a_lone_gateway_sweeps_the_registry_it_leads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = gateway_with(tmp_path, None)
    swept: list[object] = []
    monkeypatch.setattr(retention, "sweep", lambda store, clock: swept.append(store))
    gateway._sweep_if_leading()
    assert swept == [gateway.store]
