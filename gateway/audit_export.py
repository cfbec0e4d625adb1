"""A signed audit checkpoint as a small JSON document, for the operator to keep off the box.

The checkpoints in the registry live next to the records they vouch for: someone with write
access to the database can delete both. A copy of the newest checkpoint stored elsewhere still
names a sequence number and a chain head signed by the audit key, so `fleetgate audit verify
--checkpoint FILE` notices a trail cut or rewritten behind it even when the registry's own
checkpoints are gone.

The document carries nothing secret: a signature, a hash and a number. Reading it is strict, so
a damaged or foreign file is named as such rather than half-trusted; whether its signature holds
is for ``gateway.audit.verify_chain`` to say.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from gateway.enrollment.policy import SHA256_HEX
from gateway.store import AuditCheckpoint

__all__ = [
    "DOCUMENT_TYPE",
    "DOCUMENT_VERSION",
    "CheckpointFileError",
    "checkpoint_from_json",
    "checkpoint_to_json",
]

DOCUMENT_TYPE = "fleetgate-audit-checkpoint"
DOCUMENT_VERSION = 1

_FIELDS = {"type", "version", "seq", "hash", "at", "key_id", "signature"}


class CheckpointFileError(ValueError):
    """The document is not an exported audit checkpoint this version can read."""


def checkpoint_to_json(checkpoint: AuditCheckpoint) -> str:
    """The document for ``checkpoint``: one JSON object, keys sorted, ending in a newline."""
    document = {
        "type": DOCUMENT_TYPE,
        "version": DOCUMENT_VERSION,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "at": checkpoint.at.isoformat(),
        "key_id": checkpoint.key_id,
        "signature": base64.b64encode(checkpoint.signature).decode("ascii"),
    }
    return json.dumps(document, sort_keys=True, indent=2) + "\n"


# A real document is about 400 characters: anything much bigger is not one, and is refused
# before it is parsed (deep nesting made the JSON parser recurse out of its stack).
MAX_DOCUMENT_CHARS = 4096


def checkpoint_from_json(text: str) -> AuditCheckpoint:
    """Read a document written by ``checkpoint_to_json``; raises ``CheckpointFileError``
    naming the first thing that is wrong."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise CheckpointFileError(
            f"too large for an exported checkpoint (over {MAX_DOCUMENT_CHARS} characters)"
        )
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointFileError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise CheckpointFileError("not JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise CheckpointFileError("not a JSON object")
    if document.get("type") != DOCUMENT_TYPE:
        raise CheckpointFileError(f"not an exported audit checkpoint (type is not {DOCUMENT_TYPE})")
    if document.get("version") != DOCUMENT_VERSION:
        raise CheckpointFileError(
            f"unknown checkpoint document version {document.get('version')!r} "
            f"(this version reads {DOCUMENT_VERSION})"
        )
    if missing := sorted(_FIELDS - document.keys()):
        raise CheckpointFileError(f"missing field {missing[0]}")
    if unknown := sorted(document.keys() - _FIELDS):
        raise CheckpointFileError(f"unknown field {unknown[0]}")
    return AuditCheckpoint(
        seq=_seq(document["seq"]),
        hash=_hex_64("hash", document["hash"]),
        at=_time(document["at"]),
        signature=_signature(document["signature"]),
        key_id=_hex_64("key_id", document["key_id"]),
    )


def _seq(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointFileError("seq must be a whole number >= 1")
    return value


def _hex_64(name: str, value: object) -> str:
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise CheckpointFileError(f"{name} must be 64 lower-case hex digits")
    return value


def _time(value: object) -> datetime:
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.utcoffset() is None:
        raise CheckpointFileError("at must be an ISO-8601 time with its UTC offset")
    return at


def _signature(value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise CheckpointFileError("signature must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise CheckpointFileError("signature must be base64 text") from None
