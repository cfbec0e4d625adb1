"""The fleet listing of a large registry: certificates are read in bulk, not once per identity.

Right after a gateway starts, nothing is cached: one certificate query per identity took 22 s
for 100k identities, and the console gave up after 10. These tests count the registry calls a
listing makes (not seconds, which depend on the machine).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.admin import AdminService, RegistryBackend
from gateway.admin.views import BULK_LOOKUP_AFTER
from gateway.admin.wire import encode_request
from gateway.registry import convert
from gateway.registry.sql_store import CERTIFICATE, IDENTITY, SqlStore
from gateway.store import CertificateRecord, IdentityRecord, IdentityState, StoredResponse
from pki.clock import FakeClock
from pki.profile import IdentityKind

FLEET = 20_000
PEM = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"

class CountingStore(SqlStore):
    """A SQLite registry that counts the certificate lookups made on it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls = {"certificates_for": 0, "active_certificates": 0}
        for name in self.calls:
            setattr(self, name, self._counting(name, getattr(self, name)))

    def _counting(self, name: str, method: Any) -> Any:
        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return method(*args)

        return counted

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)


def device_id(n: int) -> str:
    return f"th-200-{n:06d}"


def certificate(identity_id: str, serial: int, issued_at: datetime) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        identity_id=identity_id,
        public_key_fingerprint=f"{serial:064x}",
        not_before=issued_at,
        not_after=issued_at + timedelta(hours=1),
        issued_at=issued_at,
        pem=PEM,
    )


class BigFleet:
    """``FLEET`` active devices with one certificate each, an admin operator, the service."""

    def __init__(self, path: Path) -> None:
        self.clock = FakeClock()
        self.created_at = now = self.clock.now()
        self.store = CountingStore(f"sqlite:///{path}")
        identities, certificates = [], []
        for n in range(FLEET):
            record = IdentityRecord(
                device_id(n), IdentityKind.DEVICE, IdentityState.ACTIVE, now, now, model="TH-200"
            )
            identities.append(convert.identity_values(record))
            certificates.append(convert.certificate_values(certificate(device_id(n), 1 + n, now)))
        # Written in one transaction: a fleet enrolled one by one would take minutes here.
        with self.store.engine.begin() as connection:
            connection.execute(IDENTITY.insert(), identities)
            connection.execute(CERTIFICATE.insert(), certificates)
        self.store.put_identity(
            IdentityRecord(
                "ada", IdentityKind.OPERATOR, IdentityState.ACTIVE, now, now, role="admin"
            )
        )
        self.service = AdminService(RegistryBackend(self.store, self.clock))

    def ask(
        self, op: str, args: dict[str, Any] | None = None, *, service: AdminService | None = None
    ) -> dict[str, Any]:
        service = service or self.service
        [reply] = service.handle("fg/v1/admin/ada/req", encode_request("r", op, args or {}))
        body: dict[str, Any] = json.loads(reply.payload)
        assert body["ok"], body
        result: dict[str, Any] = body["result"]
        return result

    def renew(self, identity_id: str, serial: int) -> CertificateRecord:
        self.clock.advance(timedelta(minutes=1))
        now = self.clock.now()
        record = self.store.get_identity(identity_id)
        assert record is not None
        renewed = certificate(identity_id, serial, now)
        self.store.record_outcome(
            response=StoredResponse(
                identity_id, f"renew-{serial}", "renew", "issued", b"", now, "0" * 64
            ),
            identity=IdentityRecord(
                record.id, record.kind, record.state, record.created_at, now, model=record.model
            ),
            certificate=renewed,
        )
        return renewed


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory: pytest.TempPathFactory) -> BigFleet:
    return BigFleet(tmp_path_factory.mktemp("registry") / "registry.db")


def test_the_first_listing_reads_every_certificate_in_one_query(big_fleet: BigFleet) -> None:
    big_fleet.store.reset()
    result = big_fleet.ask("list_identities", {"kind": "device"})
    assert result["total"] == FLEET
    assert big_fleet.store.calls == {"certificates_for": 0, "active_certificates": 1}
    not_after = {row["id"]: row["cert_not_after"] for row in result["identities"]}
    assert not_after[device_id(0)] == (big_fleet.created_at + timedelta(hours=1)).isoformat()
    assert None not in not_after.values()


def test_a_few_renewals_are_read_one_by_one_and_show_at_once(big_fleet: BigFleet) -> None:
    big_fleet.ask("list_identities")
    renewed = {device_id(n): big_fleet.renew(device_id(n), 10_000_000 + n) for n in (3, 77, 19_999)}
    big_fleet.store.reset()
    rows = {row["id"]: row for row in big_fleet.ask("list_identities")["identities"]}
    assert big_fleet.store.calls == {"certificates_for": len(renewed), "active_certificates": 0}
    for identity_id, cert in renewed.items():
        assert rows[identity_id]["cert_not_after"] == cert.not_after.isoformat()


def test_many_changes_since_the_last_listing_take_one_query_again(big_fleet: BigFleet) -> None:
    big_fleet.ask("list_identities")
    changed = BULK_LOOKUP_AFTER + 1
    for n in range(changed):
        big_fleet.renew(device_id(1000 + n), 20_000_000 + n)
    big_fleet.store.reset()
    big_fleet.ask("list_identities")
    assert big_fleet.store.calls == {"certificates_for": 0, "active_certificates": 1}


def test_attention_reads_the_certificates_in_bulk_too(big_fleet: BigFleet) -> None:
    # A gateway just started (nothing cached), 55 minutes into the first certificates' hour.
    now = big_fleet.created_at + timedelta(minutes=55)
    service = AdminService(RegistryBackend(big_fleet.store, FakeClock(now)))
    big_fleet.store.reset()
    expiring = big_fleet.ask("attention", service=service)["expiring"]
    assert big_fleet.store.calls == {"certificates_for": 0, "active_certificates": 1}
    rows = big_fleet.ask("list_identities", {"kind": "device"}, service=service)["identities"]
    # The smaller of 10 minutes and a third of the 1-hour lifetime.
    soon = (now + timedelta(minutes=10)).isoformat()
    assert len(expiring) > FLEET / 2
    by_expiry = sorted(rows, key=lambda r: (r["cert_not_after"], r["id"]))
    assert expiring == [r["id"] for r in by_expiry if r["cert_not_after"] <= soon]
