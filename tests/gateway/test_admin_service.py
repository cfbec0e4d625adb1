"""The admin API's core without sockets: requests in, replies out, over an in-memory registry."""

from __future__ import annotations

import dataclasses
import json
import socket
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.admin import AdminService, RegistryBackend, Role
from gateway.admin.events import EventRelay
from gateway.admin.roles import ADMIN_OPS, ALL_OPS, OPERATE_OPS, READ_OPS
from gateway.admin.service import MAX_AUDITED_TARGETS
from gateway.admin.wire import encode_request
from gateway.audit import AuditWriter
from gateway.cluster import ClusterError, ClusterReason
from gateway.operations import OperationError, OperationRefusal
from gateway.service import GatewayEvent
from gateway.store import (
    AuditRecord,
    CertificateRecord,
    CertificateStatus,
    IdentityRecord,
    IdentityState,
    RefusalRecord,
    StoredResponse,
    StoreError,
    refusal_key,
)
from gateway.store_memory import MemoryStore
from pki.clock import FakeClock
from pki.csr import public_key_fingerprint
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

TRUST_DOMAIN = "fleet.test"
OPERATORS = {"vera": Role.VIEWER, "otto": Role.OPERATOR, "ada": Role.ADMIN}


class Fleet:
    """A registry with three operators and four devices in every state, and the service."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.ca = make_issuing_ca(self.clock)
        self.issuer = Issuer(self.ca, self.clock)
        self.audit_key = LocalSigner.generate()
        self.audit = AuditWriter(self.store, self.audit_key, self.clock, every=1000)
        for name, role in OPERATORS.items():
            self.add(name, IdentityKind.OPERATOR, IdentityState.ACTIVE, role=role.value)
        self.add("dev-1", IdentityKind.DEVICE, IdentityState.ACTIVE, model="TH-200")
        self.add("dev-2", IdentityKind.DEVICE, IdentityState.PENDING, model="TH-200")
        self.add("dev-3", IdentityKind.DEVICE, IdentityState.QUARANTINED, model="CAM-9")
        self.add("dev-4", IdentityKind.DEVICE, IdentityState.ACTIVE, model="CAM-9")
        self.store.change_state("dev-4", IdentityState.REVOKED, self.clock.now())
        self.backend = RegistryBackend(
            self.store,
            self.clock,
            audit_key=self.audit_key.public_key(),
            connected=frozenset({"dev-1", "ada"}),
        )
        self.events = EventRelay(None)
        self.service = AdminService(self.backend, events=self.events)

    def add(
        self,
        name: str,
        kind: IdentityKind,
        state: IdentityState,
        *,
        lifetime: timedelta = timedelta(hours=1),
        **fields: Any,
    ) -> CertificateRecord:
        now = self.clock.now()
        key = LocalSigner.generate()
        cert = self.issuer.issue(
            LeafTemplate(kind=kind, name=name, trust_domain=TRUST_DOMAIN, lifetime=lifetime),
            key.public_key(),
        )
        existing = self.store.get_identity(name)
        identity = (
            dataclasses.replace(existing, updated_at=now)
            if existing is not None
            else IdentityRecord(name, kind, state, now, now, **fields)
        )
        row = CertificateRecord(
            serial=cert.serial_number,
            identity_id=name,
            public_key_fingerprint=public_key_fingerprint(key.public_key()),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issued_at=now,
            pem=cert.public_bytes(Encoding.PEM).decode(),
        )
        self.store.record_outcome(
            response=StoredResponse(
                name, f"req-{cert.serial_number:x}", "enroll", "issued", b"", now, "0" * 64
            ),
            identity=identity,
            certificate=row,
        )
        return row

    def raw(self, operator: str, payload: bytes) -> dict[str, Any]:
        [reply] = self.service.handle(f"fg/v1/admin/{operator}/req", payload)
        assert reply.topic == f"fg/v1/admin/{operator}/resp"
        assert reply.qos == 1
        body: dict[str, Any] = json.loads(reply.payload)
        assert body["v"] == 1
        return body

    def ask(self, operator: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.raw(operator, encode_request("req-1", op, args or {}))

    def ok(self, operator: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.ask(operator, op, args)
        assert body["ok"] is True, body
        assert body["id"] == "req-1"
        result: dict[str, Any] = body["result"]
        return result

    def error(self, operator: str, op: str, args: dict[str, Any] | None = None) -> str:
        body = self.ask(operator, op, args)
        assert body["ok"] is False, body
        assert set(body["error"]) == {"reason", "detail"} and body["error"]["detail"]
        reason: str = body["error"]["reason"]
        return reason

    def last_audit(self) -> AuditRecord:
        return self.store.audit_records()[-1]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


# -- who asks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "role"), list(OPERATORS.items()))
def test_whoami_names_the_operator_behind_the_topic_and_its_role(
    fleet: Fleet, name: str, role: Role
) -> None:
    assert fleet.ok(name, "whoami") == {"operator": name, "role": role.value}


VALID_ARGS: dict[str, dict[str, Any]] = {
    "whoami": {},
    "list_identities": {},
    "get_identity": {"id": "dev-1"},
    "audit": {},
    "attention": {},
    "operators": {},
    "metrics": {},
    "approve": {"ids": ["dev-2"]},
    "quarantine": {"ids": ["dev-1"], "reason": "odd traffic"},
    "release": {"ids": ["dev-3"]},
    "revoke": {"ids": ["dev-1"], "reason": "stolen"},
    "set_role": {"name": "vera", "role": "operator"},
    "revoke_operator": {"name": "vera", "reason": "left the company"},
}


def _allowed(role: Role, op: str) -> bool:
    if op in READ_OPS:
        return True
    if op in OPERATE_OPS:
        return role in (Role.OPERATOR, Role.ADMIN)
    return role is Role.ADMIN


@pytest.mark.parametrize("op", sorted(ALL_OPS))
@pytest.mark.parametrize("role", list(Role))
def test_every_op_is_allowed_exactly_to_the_roles_that_hold_it(
    fleet: Fleet, role: Role, op: str
) -> None:
    assert set(VALID_ARGS) == ALL_OPS
    name = next(n for n, r in OPERATORS.items() if r is role)
    if name == "vera" and op in ("set_role", "revoke_operator"):
        args = {**VALID_ARGS[op], "name": "otto"}
    else:
        args = VALID_ARGS[op]
    before = len(fleet.store.audit_records())
    body = fleet.ask(name, op, args)
    if _allowed(role, op):
        assert body["ok"] is True, body
        return
    assert body["ok"] is False and body["error"]["reason"] == "forbidden"
    assert fleet.service.metrics["rejected.forbidden"] == 1
    # The refusal is in the audit trail, with who asked, what, about whom and why.
    [entry] = [r.entry for r in fleet.store.audit_records()[before:]]
    assert entry.actor == f"operator:{name}"
    assert entry.action == op
    assert entry.outcome == "rejected" and entry.reasons == ("forbidden",)
    assert entry.subject == args.get("name", (args.get("ids") or [None])[0])
    assert entry.detail["role"] == role.value
    # ...and nothing changed.
    assert fleet.store.get_identity("dev-1").state is IdentityState.ACTIVE
    assert fleet.store.get_identity("otto").role == "operator"


def test_the_role_ladder_is_complete() -> None:
    assert READ_OPS | OPERATE_OPS | ADMIN_OPS == ALL_OPS
    assert not (READ_OPS & OPERATE_OPS or OPERATE_OPS & ADMIN_OPS or READ_OPS & ADMIN_OPS)


def test_a_forbidden_bulk_request_is_audited_once_per_target(fleet: Fleet) -> None:
    ids = [f"dev-{n}" for n in range(MAX_AUDITED_TARGETS + 20)]
    assert fleet.error("vera", "quarantine", {"ids": ids, "reason": "x"}) == "forbidden"
    rejected = [r.entry for r in fleet.store.audit_records() if r.entry.outcome == "rejected"]
    assert [e.subject for e in rejected] == ids[:MAX_AUDITED_TARGETS]


def test_a_forbidden_read_is_audited_against_the_operator_itself(fleet: Fleet) -> None:
    fleet.store.put_identity(
        dataclasses.replace(fleet.store.get_identity("vera"), role="superuser")
    )
    assert fleet.error("vera", "list_identities") == "forbidden"
    entry = fleet.last_audit().entry
    assert (entry.actor, entry.action) == ("operator:vera", "list_identities")
    assert entry.subject == "vera"
    assert entry.detail["role"] == "none"


@pytest.mark.parametrize(
    ("setup", "name"),
    [
        ("unknown", "mallory"),  # no identity at all
        ("device", "dev-1"),  # a device's name on an operator topic
        ("revoked", "vera"),
        ("pending", "vera"),
        ("no_role", "vera"),
    ],
)
def test_only_an_active_operator_with_a_role_is_served(
    fleet: Fleet, setup: str, name: str
) -> None:
    vera = fleet.store.get_identity("vera")
    if setup == "revoked":
        fleet.store.change_state("vera", IdentityState.REVOKED, fleet.clock.now())
    elif setup == "pending":
        fleet.store.put_identity(dataclasses.replace(vera, state=IdentityState.PENDING))
    elif setup == "no_role":
        fleet.store.put_identity(dataclasses.replace(vera, role=None))
    assert fleet.error(name, "whoami") == "forbidden"
    entry = fleet.last_audit().entry
    assert entry.actor == f"operator:{name}" and entry.outcome == "rejected"


def test_a_role_change_takes_effect_at_the_next_request(fleet: Fleet) -> None:
    assert fleet.error("vera", "approve", {"ids": ["dev-2"]}) == "forbidden"
    assert fleet.ok("ada", "set_role", {"name": "vera", "role": "operator"}) == {
        "name": "vera",
        "role": "operator",
    }
    assert fleet.ok("vera", "whoami")["role"] == "operator"
    assert fleet.ok("vera", "approve", {"ids": ["dev-2"]})["results"][0]["ok"] is True
    entry = next(r.entry for r in fleet.store.audit_records() if r.entry.action == "set_role")
    assert entry.actor == "operator:ada" and entry.detail == {"from": "viewer", "to": "operator"}


# -- bad input ----------------------------------------------------------------------------------


def _request(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": "r-9", "op": "whoami", "args": {}, **fields}).encode()


def _without(key: str) -> bytes:
    data = {"v": 1, "id": "r-9", "op": "whoami", "args": {}}
    del data[key]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("payload", "reason", "echoed_id"),
    [
        (b"{not json", "malformed", None),
        (b"", "malformed", None),
        (b"[1, 2]", "malformed", None),
        (b'"whoami"', "malformed", None),
        (b"\xff\xfe{}", "malformed", None),
        (b'{"v": 1, "id": "a", "id": "b", "op": "whoami"}', "malformed", None),
        (b"{" + b" " * (65 * 1024) + b"}", "payload_too_large", None),
        (_without("v"), "invalid_field", "r-9"),
        (_request(v="1"), "invalid_field", "r-9"),
        (_request(v=True), "invalid_field", "r-9"),
        (_request(v=2), "unsupported_version", "r-9"),
        (_without("id"), "invalid_field", None),
        (_request(id=""), "invalid_field", None),
        (_request(id="x" * 65), "invalid_field", None),
        (_request(id="a/b"), "invalid_field", None),
        (_request(id=7), "invalid_field", None),
        (_without("op"), "invalid_field", "r-9"),
        (_request(op=3), "invalid_field", "r-9"),
        (_request(op=""), "invalid_field", "r-9"),
        (_request(args=[1]), "invalid_field", "r-9"),
        (_request(args="x"), "invalid_field", "r-9"),
        (_request(op="format_disk"), "unknown_op", "r-9"),
        (_request(op="x" * 5000), "unknown_op", "r-9"),
        (_request(args={"a": {"b": {"c": 1}}}), "invalid_field", "r-9"),
        (b'{"v": 1, "id": "r-9", "op": "whoami", "n": 1' + b"0" * 40 + b"}", "invalid_field",
         None),
        (b'{"v": 1, "id": "r-9", "op": "whoami", "n": NaN}', "invalid_field", None),
        (b"[" * 100_000 + b"]" * 100_000, "payload_too_large", None),
        (b"[" * 5000 + b"]" * 5000, "invalid_field", None),
    ],
)
def test_bad_input_gets_a_typed_error_and_is_counted(
    fleet: Fleet, payload: bytes, reason: str, echoed_id: str | None
) -> None:
    body = fleet.raw("ada", payload)
    assert body["ok"] is False
    assert body["error"]["reason"] == reason
    assert body["id"] == echoed_id
    assert fleet.service.metrics[f"rejected.{reason}"] == 1
    # Still serving.
    assert fleet.ok("ada", "whoami")["operator"] == "ada"


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("whoami", {"verbose": True}),  # an argument the op does not take
        ("list_identities", {"kind": "toaster"}),
        ("list_identities", {"state": 3}),
        ("list_identities", {"limit": 0}),
        ("list_identities", {"limit": True}),
        ("list_identities", {"limit": "10"}),
        ("list_identities", {"offset": -1}),
        ("get_identity", {}),
        ("get_identity", {"id": 5}),
        ("get_identity", {"id": "../etc"}),
        ("get_identity", {"id": "dev-1\x00"}),
        ("audit", {"since": "yesterday"}),
        ("audit", {"since": "2026-01-01T00:00:00"}),  # no offset: ambiguous
        ("audit", {"until": 1700000000}),
        ("audit", {"limit": 10**6}),
        ("audit", {"actor": "x" * 201}),
        ("quarantine", {"ids": ["dev-1"]}),  # a quarantine says why
        ("quarantine", {"ids": ["dev-1"], "reason": "   "}),
        ("quarantine", {"ids": ["dev-1"], "reason": "x" * 501}),
        ("quarantine", {"ids": "dev-1", "reason": "x"}),
        ("quarantine", {"ids": [], "reason": "x"}),
        ("quarantine", {"ids": [1], "reason": "x"}),
        ("quarantine", {"ids": ["dev 1"], "reason": "x"}),
        ("quarantine", {"ids": ["dev-1"] * 1001, "reason": "x"}),
        ("quarantine", {"reason": "x"}),
        ("revoke", {"ids": ["dev-1"]}),
        ("approve", {"ids": ["dev-2"], "reason": 4}),
        ("set_role", {"name": "vera", "role": "root"}),
        ("set_role", {"name": "vera"}),
        ("set_role", {"role": "viewer"}),
        ("revoke_operator", {"name": "vera"}),
    ],
)
def test_bad_arguments_are_invalid_field_and_change_nothing(
    fleet: Fleet, op: str, args: dict[str, Any]
) -> None:
    before = len(fleet.store.audit_records())
    assert fleet.error("ada", op, args) == "invalid_field"
    assert fleet.service.metrics["rejected.invalid_field"] == 1
    assert len(fleet.store.audit_records()) == before
    assert fleet.store.get_identity("dev-1").state is IdentityState.ACTIVE


@pytest.mark.parametrize(
    "topic",
    ["fg/v1/admin/events", "fg/v1/admin/ada/resp", "fg/v1/admin/a+b/req", "fg/v1/admin/ada/req/x"],
)
def test_messages_on_other_topics_are_ignored(fleet: Fleet, topic: str) -> None:
    assert fleet.service.handle(topic, encode_request("r", "whoami")) == []
    assert fleet.service.metrics["ignored.topic"] == 1


def test_a_registry_that_is_down_is_unavailable_not_a_crash(fleet: Fleet) -> None:
    def down(identity_id: str) -> IdentityRecord:
        raise StoreError("database is locked")

    fleet.store.get_identity = down  # type: ignore[method-assign]
    assert fleet.error("ada", "whoami") == "unavailable"
    assert fleet.service.metrics["rejected.unavailable"] == 1


def test_a_bug_is_answered_internal_and_the_service_keeps_serving(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> frozenset[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(fleet.backend, "connected", broken)
    assert fleet.error("ada", "list_identities") == "internal"
    assert fleet.service.metrics["rejected.internal"] == 1
    assert fleet.ok("ada", "whoami")["role"] == "admin"


# -- reading ------------------------------------------------------------------------------------


def test_list_identities_shows_every_column_the_console_needs(fleet: Fleet) -> None:
    result = fleet.ok("vera", "list_identities")
    rows = {row["id"]: row for row in result["identities"]}
    assert result["total"] == len(rows) == 7
    assert [row["id"] for row in result["identities"]] == sorted(rows)
    dev1 = rows["dev-1"]
    assert set(dev1) == {
        "id", "kind", "state", "model", "manufacturer", "firmware_version", "connected",
        "last_seen_at", "cert_not_after", "role",
    }
    assert dev1["kind"] == "device" and dev1["state"] == "active" and dev1["model"] == "TH-200"
    assert dev1["connected"] is True and rows["dev-2"]["connected"] is False
    [cert] = fleet.store.certificates_for("dev-1")
    assert dev1["cert_not_after"] == cert.not_after.isoformat()
    assert rows["dev-4"]["cert_not_after"] is None  # revoked: nothing in force
    assert rows["ada"]["role"] == "admin" and rows["ada"]["kind"] == "operator"


def test_list_identities_filters_by_kind_and_state_and_pages(fleet: Fleet) -> None:
    devices = fleet.ok("vera", "list_identities", {"kind": "device"})
    assert [r["id"] for r in devices["identities"]] == ["dev-1", "dev-2", "dev-3", "dev-4"]
    quarantined = fleet.ok("vera", "list_identities", {"state": "quarantined"})
    assert [r["id"] for r in quarantined["identities"]] == ["dev-3"]
    page = fleet.ok("vera", "list_identities", {"kind": "device", "limit": 2, "offset": 1})
    assert [r["id"] for r in page["identities"]] == ["dev-2", "dev-3"] and page["total"] == 4


def test_a_renewal_shows_in_the_listing_at_once(fleet: Fleet) -> None:
    before = {r["id"]: r for r in fleet.ok("vera", "list_identities")["identities"]}
    fleet.clock.advance(timedelta(minutes=40))
    renewed = fleet.add("dev-1", IdentityKind.DEVICE, IdentityState.ACTIVE)
    after = {r["id"]: r for r in fleet.ok("vera", "list_identities")["identities"]}
    assert after["dev-1"]["cert_not_after"] == renewed.not_after.isoformat()
    assert after["dev-1"]["cert_not_after"] != before["dev-1"]["cert_not_after"]


def test_get_identity_gives_certificates_history_attestation_and_telemetry(fleet: Fleet) -> None:
    fleet.store.put_identity(
        dataclasses.replace(
            fleet.store.get_identity("dev-1"),
            manufacturer="Acme",
            firmware_version="1.2.3",
            firmware_digest="ab" * 32,
            birth_fingerprint="cd" * 32,
        )
    )
    fleet.ok("otto", "quarantine", {"ids": ["dev-1"], "reason": "odd traffic"})
    for _ in range(3):
        fleet.service.telemetry.count("dev-1")
    fleet.clock.advance(timedelta(minutes=1))
    fleet.service.telemetry.count("dev-1")
    result = fleet.ok("vera", "get_identity", {"id": "dev-1"})
    assert result["id"] == "dev-1" and result["state"] == "quarantined"
    [cert] = result["certificates"]
    row = fleet.store.certificates_for("dev-1")[0]
    assert cert["serial"] == f"{row.serial:x}" and cert["status"] == "active"
    assert cert["san"] == [f"URI:spiffe://{TRUST_DOMAIN}/device/dev-1"]
    assert "Test Issuing CA" in cert["issuer"] and cert["subject"]
    assert cert["not_after"] == row.not_after.isoformat() and cert["pem"] == row.pem
    assert [h["action"] for h in result["history"]] == ["quarantine"]
    assert result["history"][0]["actor"] == "operator:otto"
    assert result["attestation"] == {
        "manufacturer": "Acme",
        "model": "TH-200",
        "firmware_version": "1.2.3",
        "firmware_digest": "ab" * 32,
        "birth_fingerprint": "cd" * 32,
    }
    per_minute = result["telemetry"]["per_minute"]
    assert len(per_minute) == 30 and per_minute[-2:] == [3, 1] and sum(per_minute) == 4
    assert result["telemetry"]["total"] == 4


def test_get_identity_of_an_unknown_id_is_not_found(fleet: Fleet) -> None:
    assert fleet.error("vera", "get_identity", {"id": "dev-404"}) == "not_found"


def test_audit_filters_newest_first_and_verifies_the_chain(fleet: Fleet) -> None:
    fleet.ok("otto", "quarantine", {"ids": ["dev-1"], "reason": "one"})
    fleet.clock.advance(timedelta(minutes=5))
    middle = fleet.clock.now()
    fleet.ok("otto", "release", {"ids": ["dev-1"]})
    fleet.clock.advance(timedelta(minutes=5))
    fleet.ok("ada", "revoke", {"ids": ["dev-1"], "reason": "two"})
    fleet.audit.checkpoint()
    everything = fleet.ok("vera", "audit")
    actions = [r["action"] for r in everything["records"]]
    assert actions[:3] == ["revoke", "release", "quarantine"]
    assert everything["verified"] == {
        "ok": True,
        "problem": "",
        "checked": len(fleet.store.audit_records()),
        "last_checkpoint_seq": fleet.store.audit_records()[-1].seq,
        "warning": "",
    }
    by_actor = fleet.ok("vera", "audit", {"actor": "operator:otto"})
    assert [r["action"] for r in by_actor["records"]] == ["release", "quarantine"]
    assert fleet.ok("vera", "audit", {"action": "revoke"})["total"] == 1
    assert fleet.ok("vera", "audit", {"subject": "dev-3"})["records"] == []
    window = fleet.ok(
        "vera", "audit", {"since": middle.isoformat(), "until": middle.isoformat()}
    )
    assert [r["action"] for r in window["records"]] == ["release"]
    limited = fleet.ok("vera", "audit", {"limit": 1})
    assert [r["action"] for r in limited["records"]] == ["revoke"] and limited["total"] > 1


def test_audit_reports_an_edited_record(fleet: Fleet) -> None:
    fleet.ok("otto", "quarantine", {"ids": ["dev-1"], "reason": "odd"})
    real = fleet.store.audit_records

    def edited(after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        records = real(after_seq, limit)
        first = records[0]
        forged = dataclasses.replace(first.entry, actor="operator:nobody")
        return [dataclasses.replace(first, entry=forged), *records[1:]]

    fleet.store.audit_records = edited  # type: ignore[method-assign]
    verified = fleet.ok("vera", "audit")["verified"]
    assert verified["ok"] is False and "1" in verified["problem"]


def _service_signing_every(fleet: Fleet, every: int) -> AdminService:
    return AdminService(fleet.backend, events=fleet.events, audit_every=every)


def _ask(service: AdminService, operator: str, op: str) -> dict[str, Any]:
    [reply] = service.handle(f"fg/v1/admin/{operator}/req", encode_request("req-1", op, {}))
    body: dict[str, Any] = json.loads(reply.payload)
    assert body["ok"] is True, body
    result: dict[str, Any] = body["result"]
    return result


def test_audit_warns_of_a_trail_whose_checkpoints_were_all_deleted(fleet: Fleet) -> None:
    service = _service_signing_every(fleet, 3)
    for reason in ("one", "two", "three"):
        fleet.ok("otto", "quarantine", {"ids": ["dev-1"], "reason": reason})
        fleet.ok("otto", "release", {"ids": ["dev-1"]})
    fleet.audit.checkpoint()
    records = len(fleet.store.audit_records())
    assert records > 3
    verified = _ask(service, "vera", "audit")["verified"]
    assert verified["ok"] is True and verified["warning"] == ""

    fleet.store.checkpoints = lambda: []  # type: ignore[method-assign]
    verified = _ask(service, "vera", "audit")["verified"]
    assert verified["ok"] is True  # may be innocent: commands sign nothing on their own
    assert "checkpoints were deleted" in verified["warning"]
    assert f"{records} records" in verified["warning"]


@pytest.mark.parametrize("every", [0, -1, True, 2.5])
def test_an_interval_that_is_no_interval_is_refused_at_once(fleet: Fleet, every: object) -> None:
    with pytest.raises(ValueError):
        AdminService(fleet.backend, audit_every=every)  # type: ignore[arg-type]


def test_a_short_trail_not_signed_yet_is_no_deleted_checkpoint(fleet: Fleet) -> None:
    # A new gateway signs once the interval has passed: fewer records than that, no alarm.
    service = _service_signing_every(fleet, 1000)
    fleet.ok("otto", "quarantine", {"ids": ["dev-1"], "reason": "odd"})
    assert fleet.store.checkpoints() == []
    assert _ask(service, "vera", "audit")["verified"]["ok"] is True


def test_attention_lists_what_needs_a_person(fleet: Fleet) -> None:
    # dev-5: a certificate about to lapse without renewal (1 h lifetime, 5 minutes left).
    fleet.add("dev-5", IdentityKind.DEVICE, IdentityState.ACTIVE)
    fleet.clock.advance(timedelta(minutes=56))
    fleet.add("dev-1", IdentityKind.DEVICE, IdentityState.ACTIVE)  # renewed: healthy
    fleet.events(GatewayEvent("clone", "dev-1", fleet.clock.now(), {"first": "a", "second": "b"}))
    fleet.events(GatewayEvent("connected", "dev-1", fleet.clock.now()))
    fleet.events(GatewayEvent("anomaly", "dev-3", fleet.clock.now(), {"why": "rate"}))
    now = fleet.clock.now()
    fleet.store.record_refusals(
        [
            RefusalRecord(
                key=refusal_key("operational", "not_enrolled", None, "ghost"),
                listener="operational",
                reason="not_enrolled",
                client_id="ghost",
                cert_subject=None,
                cert_issuer="CN=Elsewhere",
                cert_fingerprint=None,
                remote="10.0.0.9:5000",
                first_seen=now,
                last_seen=now,
                count=3,
            )
        ]
    )
    result = fleet.ok("vera", "attention")
    assert result["pending"] == ["dev-2"]
    assert result["quarantined"] == ["dev-3"]
    assert result["expiring"] == ["dev-5"]
    assert [(e["kind"], e["subject"]) for e in result["events"]] == [
        ("anomaly", "dev-3"),
        ("clone", "dev-1"),
    ]
    [unknown] = result["unknown"]
    assert unknown["client_id"] == "ghost" and unknown["count"] == 3
    assert unknown["cert_issuer"] == "CN=Elsewhere"


def test_a_healthy_device_due_for_renewal_is_not_flagged_as_expiring(fleet: Fleet) -> None:
    # Renewal happens at about two thirds of the lifetime: 20 minutes left of an hour.
    fleet.clock.advance(timedelta(minutes=41))
    assert "dev-1" not in fleet.ok("vera", "attention")["expiring"]
    fleet.clock.advance(timedelta(minutes=10))  # 9 minutes left: renewal is overdue
    assert "dev-1" in fleet.ok("vera", "attention")["expiring"]


def test_operators_lists_people_with_their_roles(fleet: Fleet) -> None:
    operators = fleet.ok("vera", "operators")["operators"]
    assert [(o["id"], o["role"]) for o in operators] == [
        ("ada", "admin"),
        ("otto", "operator"),
        ("vera", "viewer"),
    ]
    assert [o["connected"] for o in operators] == [True, False, False]
    assert all(o["cert_not_after"] and o["created_at"] for o in operators)


def test_metrics_answers_the_counters_of_the_gateway_that_answered(fleet: Fleet) -> None:
    assert fleet.error("vera", "revoke", {"ids": ["dev-1"], "reason": "x"}) == "forbidden"
    assert fleet.error("vera", "no_such_op") == "unknown_op"
    result = fleet.ok("vera", "metrics")
    assert set(result) == {"node", "at", "enrollment", "gateway", "broker", "admin"}
    # RegistryBackend: no gateway runs here, nothing of one was counted
    assert result["node"] == socket.gethostname()
    assert result["at"] == fleet.clock.now().isoformat()
    assert result["enrollment"] == result["gateway"] == result["broker"] == {}
    # the admin API's own counters, up to this request (answered ok once it is done)
    assert result["admin"] == {
        "requests": 3,
        "rejected.forbidden": 1,
        "rejected.unknown_op": 1,
    }
    assert fleet.ok("vera", "metrics")["admin"]["ok.metrics"] == 1


def test_metrics_carries_the_event_relays_counters_as_admin_events(fleet: Fleet) -> None:
    async def publish(payload: bytes) -> None:
        raise AssertionError("nobody listens: nothing is sent")

    relay = EventRelay(publish, heard=lambda: False)
    service = AdminService(fleet.backend, events=relay)
    for _ in range(2):
        relay(GatewayEvent("clone", "dev-1", fleet.clock.now(), {"first": "a"}))
    assert _ask(service, "vera", "metrics")["admin"]["events.unheard"] == 2


@pytest.mark.parametrize("name", ["mallory", "dev-1"])
def test_metrics_are_refused_to_anyone_but_an_operator(fleet: Fleet, name: str) -> None:
    assert fleet.error(name, "metrics") == "forbidden"
    entry = fleet.last_audit().entry
    assert (entry.actor, entry.action, entry.outcome) == (
        f"operator:{name}",
        "metrics",
        "rejected",
    )


# -- acting on devices ------------------------------------------------------------------------


def test_bulk_quarantine_reports_each_device_and_one_failure_hides_nothing(fleet: Fleet) -> None:
    result = fleet.ok(
        "otto",
        "quarantine",
        {"ids": ["dev-1", "dev-404", "dev-4", "ada", "dev-3", "dev-1"], "reason": "sweep"},
    )
    by_id = {r["id"]: r for r in result["results"]}
    assert [r["id"] for r in result["results"]] == ["dev-1", "dev-404", "dev-4", "ada", "dev-3"]
    assert by_id["dev-1"] == {"id": "dev-1", "ok": True, "state": "quarantined"}
    assert by_id["dev-404"]["error"]["reason"] == "not_found"
    assert by_id["dev-4"]["error"]["reason"] == "transition_forbidden"  # revoked is final
    assert by_id["ada"]["error"]["reason"] == "wrong_kind"  # operators are not devices
    assert by_id["dev-3"]["error"]["reason"] == "transition_forbidden"  # already quarantined
    assert (result["succeeded"], result["failed"]) == (1, 4)
    assert fleet.store.get_identity("dev-1").state is IdentityState.QUARANTINED
    assert fleet.store.get_identity("ada").state is IdentityState.ACTIVE
    # The change and each refusal are in the trail, under the operator's name.
    entries = [r.entry for r in fleet.store.audit_records() if r.entry.action == "quarantine"]
    assert {(e.subject, e.outcome) for e in entries} == {
        ("dev-1", "ok"),
        ("dev-404", "rejected"),
        ("dev-4", "rejected"),
        ("ada", "rejected"),
        ("dev-3", "rejected"),
    }
    assert all(e.actor == "operator:otto" for e in entries)
    ok = next(e for e in entries if e.outcome == "ok")
    assert ok.reasons == ("sweep",)


def test_approve_activates_a_pending_device_only(fleet: Fleet) -> None:
    result = fleet.ok("otto", "approve", {"ids": ["dev-2", "dev-3"]})
    assert result["results"][0] == {"id": "dev-2", "ok": True, "state": "active"}
    assert result["results"][1]["error"]["reason"] == "not_pending"
    assert fleet.store.get_identity("dev-3").state is IdentityState.QUARANTINED
    approval = next(r.entry for r in fleet.store.audit_records() if r.entry.action == "approve")
    assert approval.actor == "operator:otto" and approval.subject == "dev-2"


def test_release_and_revoke_follow_the_lifecycle(fleet: Fleet) -> None:
    released = fleet.ok("otto", "release", {"ids": ["dev-3"], "reason": "looked fine"})
    assert released["results"] == [{"id": "dev-3", "ok": True, "state": "active"}]
    revoked = fleet.ok("ada", "revoke", {"ids": ["dev-3"], "reason": "stolen"})
    assert revoked["results"] == [{"id": "dev-3", "ok": True, "state": "revoked"}]
    assert all(
        c.status is CertificateStatus.REVOKED for c in fleet.store.certificates_for("dev-3")
    )
    again = fleet.ok("otto", "release", {"ids": ["dev-3"]})
    assert again["results"][0]["error"]["reason"] == "transition_forbidden"


def test_a_broker_that_does_not_confirm_fails_that_device_only(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fleet.backend.set_state

    def slow_for_dev1(identity_id: str, state: IdentityState, **kwargs: Any) -> IdentityRecord:
        if identity_id == "dev-1":
            raise TimeoutError
        return real(identity_id, state, **kwargs)

    monkeypatch.setattr(fleet.backend, "set_state", slow_for_dev1)
    fleet.add("dev-6", IdentityKind.DEVICE, IdentityState.ACTIVE)
    result = fleet.ok("otto", "quarantine", {"ids": ["dev-1", "dev-6"], "reason": "x"})
    assert result["results"][0]["error"]["reason"] == "unavailable"
    assert result["results"][1] == {"id": "dev-6", "ok": True, "state": "quarantined"}


def test_a_change_no_cluster_leader_confirmed_is_reported_recorded_not_enforced(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gateway of a cluster that does not lead records the change, then waits for the leader
    # to enforce it; with no leader it raises ClusterError(NOT_ENFORCED).
    real = fleet.backend.set_state

    def no_leader_for_some(identity_id: str, state: IdentityState, **kwargs: Any) -> IdentityRecord:
        record = real(identity_id, state, **kwargs)
        if identity_id in ("dev-1", "otto"):
            raise ClusterError(ClusterReason.NOT_ENFORCED, "no leader confirmed it within 10 s")
        return record

    monkeypatch.setattr(fleet.backend, "set_state", no_leader_for_some)
    fleet.add("dev-6", IdentityKind.DEVICE, IdentityState.ACTIVE)
    result = fleet.ok("otto", "quarantine", {"ids": ["dev-1", "dev-6"], "reason": "x"})
    [first, second] = result["results"]
    assert first["ok"] is False and first["error"]["reason"] == "not_enforced_yet"
    assert "no leader" in first["error"]["detail"]
    assert second == {"id": "dev-6", "ok": True, "state": "quarantined"}
    assert (result["succeeded"], result["failed"]) == (1, 1)
    # recorded all the same: the next leader enforces it
    record = fleet.store.get_identity("dev-1")
    assert record is not None and record.state is IdentityState.QUARANTINED

    assert fleet.error("ada", "revoke_operator", {"name": "otto", "reason": "left"}) == (
        "not_enforced_yet"
    )
    assert fleet.service.metrics["rejected.not_enforced_yet"] == 1


def test_any_other_cluster_error_is_unavailable_not_internal(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise ClusterError(ClusterReason.NO_SHARED_BROKER, "broker.json is gone")

    monkeypatch.setattr(fleet.backend, "set_state", broken)
    monkeypatch.setattr(fleet.backend, "connected", broken)
    result = fleet.ok("otto", "release", {"ids": ["dev-3"]})
    assert result["results"][0]["error"]["reason"] == "unavailable"
    assert fleet.error("ada", "revoke_operator", {"name": "otto", "reason": "x"}) == (
        "unavailable"
    )
    # outside the state changes too (the session list asks the gateway's broker)
    assert fleet.error("vera", "operators") == "unavailable"
    assert fleet.service.metrics["rejected.internal"] == 0


def test_a_refusal_from_the_operations_layer_keeps_its_code(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(identity_id: str, **kwargs: Any) -> IdentityRecord:
        raise OperationError(OperationRefusal.DEVICE_REVOKED, f"{identity_id} is revoked")

    monkeypatch.setattr(fleet.backend, "approve", refuse)
    result = fleet.ok("otto", "approve", {"ids": ["dev-2"]})
    assert result["results"][0]["error"] == {
        "reason": "device_revoked",
        "detail": "dev-2 is revoked",
    }


# -- acting on operators ----------------------------------------------------------------------


def test_revoke_operator_locks_the_operator_out(fleet: Fleet) -> None:
    result = fleet.ok("ada", "revoke_operator", {"name": "otto", "reason": "left"})
    assert result == {"name": "otto", "state": "revoked"}
    assert fleet.error("otto", "whoami") == "forbidden"
    entry = [r.entry for r in fleet.store.audit_records() if r.entry.action == "revoke_operator"]
    assert entry[0].actor == "operator:ada" and entry[0].reasons == ("left",)
    assert fleet.error("ada", "revoke_operator", {"name": "otto", "reason": "again"}) == (
        "transition_forbidden"
    )
    assert fleet.error("ada", "set_role", {"name": "otto", "role": "admin"}) == (
        "transition_forbidden"
    )


@pytest.mark.parametrize(
    ("op", "args", "reason"),
    [
        ("set_role", {"name": "ada", "role": "viewer"}, "self_action"),
        ("revoke_operator", {"name": "ada", "reason": "oops"}, "self_action"),
        ("set_role", {"name": "dev-1", "role": "admin"}, "wrong_kind"),
        ("revoke_operator", {"name": "dev-1", "reason": "x"}, "wrong_kind"),
        ("set_role", {"name": "nobody", "role": "admin"}, "not_found"),
        ("revoke_operator", {"name": "nobody", "reason": "x"}, "not_found"),
    ],
)
def test_operator_management_refuses_the_wrong_target(
    fleet: Fleet, op: str, args: dict[str, Any], reason: str
) -> None:
    assert fleet.error("ada", op, args) == reason
    assert fleet.store.get_identity("ada").role == "admin"
    assert fleet.store.get_identity("ada").state is IdentityState.ACTIVE
