"""The CRL's nextUpdate comes from fleetgate.toml ([ca] crl_validity_hours), and the gateway
re-signs it long before a broker would refuse everyone for an expired CRL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography import x509

from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway
from gateway.store_memory import MemoryStore


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
