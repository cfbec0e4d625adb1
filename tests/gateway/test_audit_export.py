"""The exported checkpoint document: what `fleetgate audit checkpoint` writes reads back as the
same signed checkpoint, and a damaged or foreign document is refused, naming what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.audit import chain, make_checkpoint, verify_chain, verify_checkpoint
from gateway.audit_export import CheckpointFileError, checkpoint_from_json, checkpoint_to_json
from gateway.store import AuditEntry
from pki.keys import LocalSigner

SIGNER = LocalSigner.generate()
T0 = datetime(2026, 2, 3, 4, 5, 6, 789, tzinfo=UTC)
RECORDS = chain(
    None,
    [AuditEntry(actor="gateway", action="issue", subject=f"dev-{n}", outcome="ok", at=T0)
     for n in range(1, 6)],
)
CHECKPOINT = make_checkpoint(SIGNER, RECORDS[2], T0)


def document(**changes: object) -> str:
    data = json.loads(checkpoint_to_json(CHECKPOINT))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


def test_a_checkpoint_reads_back_as_itself_and_still_verifies() -> None:
    read = checkpoint_from_json(checkpoint_to_json(CHECKPOINT))
    assert read == CHECKPOINT
    assert verify_checkpoint(read, SIGNER.public_key())


def test_the_exported_checkpoint_names_itself_when_the_trail_falls_short() -> None:
    verdict = verify_chain(RECORDS[:2], [], SIGNER.public_key(), exported=CHECKPOINT)
    assert (verdict.first_bad_seq, verdict.problem) == (
        3, "exported checkpoint at 3 names a record that is gone (tail truncated)"
    )
    assert verify_chain(RECORDS, [], SIGNER.public_key(), exported=CHECKPOINT).ok


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "not a JSON object"),
        (document(type="fleetgate-something"), "not an exported audit checkpoint"),
        (document(version=2), "unknown checkpoint document version 2"),
        (document(key_id=None), "missing field key_id"),
        (document(extra="x"), "unknown field extra"),
        (document(seq=True), "seq must be a whole number >= 1"),
        (document(seq=0), "seq must be a whole number >= 1"),
        (document(hash="AB" * 32), "hash must be 64 lower-case hex digits"),
        (document(at="2026-02-03T04:05:06"), "at must be an ISO-8601 time with its UTC offset"),
        (document(at=17), "at must be an ISO-8601 time with its UTC offset"),
        (document(signature="not base64!"), "signature must be base64 text"),
        (document(signature=""), "signature must be base64 text"),
    ],
    ids=[
        "array", "foreign_type", "future_version", "missing_key_id", "unknown_field",
        "boolean_seq", "zero_seq", "upper_case_hash", "naive_time", "number_time",
        "bad_base64", "empty_signature",
    ],
)
def test_a_damaged_document_is_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(CheckpointFileError, match=problem):
        checkpoint_from_json(text)
