"""Between the frozen records of ``gateway.store`` and table rows.

Everything that can be refused is refused here, before a transaction starts: a record that
cannot be stored exactly raises TypeError or ValueError and the database is never touched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.store import (
    AuditCheckpoint,
    AuditEntry,
    AuditRecord,
    CertificateRecord,
    CertificateStatus,
    IdentityRecord,
    IdentityState,
    NonceRecord,
    RefusalRecord,
    StoredResponse,
    TokenRecord,
)
from gateway.store_memory import check_nonce_value, check_serial, require_aware
from pki.clock import require_aware as require_aware_time
from pki.profile import IdentityKind

__all__ = [
    "audit_from_row",
    "audit_values",
    "certificate_from_row",
    "certificate_values",
    "checkpoint_from_row",
    "checkpoint_values",
    "identity_from_row",
    "identity_values",
    "nonce_key",
    "nonce_values",
    "refusal_from_row",
    "refusal_values",
    "require_aware_time",
    "response_from_row",
    "response_values",
    "serial_key",
    "token_values",
]

Row = Mapping[Any, Any]


def serial_key(serial: int) -> str:
    """40 zero-padded hex digits: fits every RFC 5280 serial and sorts like the number."""
    return f"{check_serial(serial):040x}"


def nonce_key(value: bytes) -> str:
    return check_nonce_value(value).hex()


def identity_values(record: IdentityRecord) -> dict[str, Any]:
    require_aware(record)
    return {
        "id": record.id,
        "kind": IdentityKind(record.kind).value,
        "state": IdentityState(record.state).value,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "manufacturer": record.manufacturer,
        "model": record.model,
        "firmware_version": record.firmware_version,
        "firmware_digest": record.firmware_digest,
        "birth_fingerprint": record.birth_fingerprint,
        "role": record.role,
        "last_seen_at": record.last_seen_at,
        "reattest_required": bool(record.reattest_required),
    }


def identity_from_row(row: Row) -> IdentityRecord:
    return IdentityRecord(
        id=row["id"],
        kind=IdentityKind(row["kind"]),
        state=IdentityState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        manufacturer=row["manufacturer"],
        model=row["model"],
        firmware_version=row["firmware_version"],
        firmware_digest=row["firmware_digest"],
        birth_fingerprint=row["birth_fingerprint"],
        role=row["role"],
        last_seen_at=row["last_seen_at"],
        reattest_required=bool(row["reattest_required"]),
    )


def certificate_values(record: CertificateRecord) -> dict[str, Any]:
    require_aware(record)
    return {
        "serial": serial_key(record.serial),
        "identity_id": record.identity_id,
        "public_key_fingerprint": record.public_key_fingerprint,
        "not_before": record.not_before,
        "not_after": record.not_after,
        "issued_at": record.issued_at,
        "pem": record.pem,
        "status": CertificateStatus(record.status).value,
        "request_id": record.request_id,
        "revoked_at": record.revoked_at,
        "revocation_reason": record.revocation_reason,
    }


def certificate_from_row(row: Row) -> CertificateRecord:
    return CertificateRecord(
        serial=int(row["serial"], 16),
        identity_id=row["identity_id"],
        public_key_fingerprint=row["public_key_fingerprint"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        issued_at=row["issued_at"],
        pem=row["pem"],
        status=CertificateStatus(row["status"]),
        request_id=row["request_id"],
        revoked_at=row["revoked_at"],
        revocation_reason=row["revocation_reason"],
    )


def response_values(record: StoredResponse) -> dict[str, Any]:
    require_aware(record)
    if not isinstance(record.payload, bytes):
        raise TypeError("response payload must be bytes")
    return {
        "identity_id": record.identity_id,
        "request_id": record.request_id,
        "kind": record.kind,
        "outcome": record.outcome,
        "payload": record.payload,
        "at": record.at,
        "request_digest": record.request_digest,
        "reason": record.reason,
    }


def response_from_row(row: Row) -> StoredResponse:
    return StoredResponse(
        identity_id=row["identity_id"],
        request_id=row["request_id"],
        kind=row["kind"],
        outcome=row["outcome"],
        payload=bytes(row["payload"]),
        at=row["at"],
        request_digest=row["request_digest"],
        reason=row["reason"],
    )


def nonce_values(record: NonceRecord) -> dict[str, Any]:
    require_aware(record)
    return {
        "value": nonce_key(record.value),
        "device_id": record.device_id,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "used_at": record.used_at,
    }


def token_values(record: TokenRecord) -> dict[str, Any]:
    require_aware(record)
    return {
        "token_hash": record.token_hash,
        "device_id": record.device_id,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "created_by": record.created_by,
        "used_at": record.used_at,
    }


def audit_values(record: AuditRecord) -> dict[str, Any]:
    entry = record.entry
    return {
        "seq": record.seq,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "outcome": entry.outcome,
        "at": entry.at,
        "reasons": json.dumps(list(entry.reasons), ensure_ascii=False),
        "detail": json.dumps(dict(entry.detail), ensure_ascii=False, sort_keys=True),
    }


def audit_from_row(row: Row) -> AuditRecord:
    # Read back exactly what is stored, even if someone tampered with it: judging is
    # gateway.audit.verify_chain's job, not the reader's.
    reasons = json.loads(row["reasons"])
    detail = json.loads(row["detail"])
    entry = AuditEntry(
        actor=row["actor"],
        action=row["action"],
        subject=row["subject"],
        outcome=row["outcome"],
        at=row["at"],
        reasons=tuple(reasons) if isinstance(reasons, list) else reasons,
        detail=detail,
    )
    return AuditRecord(seq=row["seq"], entry=entry, prev_hash=row["prev_hash"], hash=row["hash"])


def checkpoint_values(record: AuditCheckpoint) -> dict[str, Any]:
    require_aware(record)
    if not isinstance(record.signature, bytes):
        raise TypeError("checkpoint signature must be bytes")
    return {
        "seq": record.seq,
        "hash": record.hash,
        "at": record.at,
        "signature": record.signature,
        "key_id": record.key_id,
    }


def checkpoint_from_row(row: Row) -> AuditCheckpoint:
    return AuditCheckpoint(
        seq=row["seq"],
        hash=row["hash"],
        at=row["at"],
        signature=bytes(row["signature"]),
        key_id=row["key_id"],
    )


def refusal_values(record: RefusalRecord) -> dict[str, Any]:
    # Callers pass records through gateway.store_memory.check_refusals first.
    return {
        "key": record.key,
        "listener": record.listener,
        "reason": record.reason,
        "client_id": record.client_id,
        "cert_subject": record.cert_subject,
        "cert_issuer": record.cert_issuer,
        "cert_fingerprint": record.cert_fingerprint,
        "remote": record.remote,
        "first_seen": record.first_seen,
        "last_seen": record.last_seen,
        "count": record.count,
    }


def refusal_from_row(row: Row) -> RefusalRecord:
    return RefusalRecord(
        key=row["key"],
        listener=row["listener"],
        reason=row["reason"],
        client_id=row["client_id"],
        cert_subject=row["cert_subject"],
        cert_issuer=row["cert_issuer"],
        cert_fingerprint=row["cert_fingerprint"],
        remote=row["remote"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        count=row["count"],
    )
