"""The audit trail's integrity: a hash chain over every record plus signed checkpoints.

Each record's hash covers the previous record's hash and the record's own canonical bytes, so
editing, deleting, inserting or reordering any record breaks the chain from that point on. A
hash chain alone does not stop someone with write access to the database from rewriting the whole
tail consistently, so the gateway signs the chain head from time to time (a checkpoint) with its
audit key; a rewritten or truncated chain no longer matches the signed checkpoints.

This module is pure: no database, no clock of its own. The stores call ``chain()`` inside the
transaction that records a change; ``AuditWriter`` is the small piece of the service that signs
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway.store import AuditCheckpoint, AuditEntry, AuditRecord, DuplicateError, Store
from pki.clock import Clock
from pki.csr import public_key_fingerprint
from pki.keys import Signer, verify_signature

__all__ = [
    "CHECKPOINT_DOMAIN",
    "GENESIS_HASH",
    "AuditWriter",
    "ChainVerdict",
    "canonical_bytes",
    "chain",
    "checkpoint_message",
    "make_checkpoint",
    "record_hash",
    "verify_chain",
    "verify_checkpoint",
]

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of record 1."""

CHECKPOINT_DOMAIN = b"fleetgate-audit-checkpoint-v1\x00"
"""Prefix of every signed checkpoint message, so the audit key's signature over a chain head can
never be mistaken for a signature over anything else (evidence, certificates, CRLs)."""

_HEX_HASH = re.compile(r"[0-9a-f]{64}")


def _utc_iso(value: object) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"audit time must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        # A naive time would hash differently depending on where it is read back.
        raise ValueError("audit time must be timezone-aware")
    # Always six fractional digits, so the bytes do not depend on whether microseconds are zero.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"audit {name} must be a str, not {type(value).__name__}")
    return value


def _check_seq(seq: object) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TypeError(f"audit seq must be an int, not {type(seq).__name__}")
    if seq < 1:
        raise ValueError(f"audit seq must be >= 1, got {seq}")
    return seq


def _check_hash(name: str, value: object) -> str:
    if not isinstance(value, str) or not _HEX_HASH.fullmatch(value):
        raise ValueError(f"{name} must be 64 lower-case hex digits")
    return value


def canonical_bytes(seq: int, entry: AuditEntry) -> bytes:
    """The bytes a record's hash covers: JSON with sorted keys and no whitespace, UTF-8.

    Keys: seq, actor, action, subject, outcome, at (ISO-8601 UTC with microseconds and a ``Z``),
    reasons (list of strings), detail (object of strings). Raises TypeError or ValueError for an
    entry that cannot be represented exactly (wrong types, naive time).
    """
    reasons = entry.reasons
    if not isinstance(reasons, tuple | list):
        raise TypeError("audit reasons must be a tuple of str")
    detail = entry.detail
    if not isinstance(detail, dict):
        raise TypeError("audit detail must be a dict of str to str")
    document = {
        "seq": _check_seq(seq),
        "actor": _check_text("actor", entry.actor),
        "action": _check_text("action", entry.action),
        "subject": _check_text("subject", entry.subject),
        "outcome": _check_text("outcome", entry.outcome),
        "at": _utc_iso(entry.at),
        "reasons": [_check_text("reason", reason) for reason in reasons],
        "detail": {
            _check_text("detail key", key): _check_text("detail value", value)
            for key, value in detail.items()
        },
    }
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def record_hash(prev_hash: str, seq: int, entry: AuditEntry) -> str:
    """sha256 hex over the previous record's hash (its 64 ASCII hex digits) then the canonical
    bytes of this record."""
    prefix = _check_hash("prev_hash", prev_hash).encode("ascii")
    return hashlib.sha256(prefix + canonical_bytes(seq, entry)).hexdigest()


def chain(prev: AuditRecord | None, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
    """Number and hash ``entries`` so they follow ``prev`` (``None``: the chain is empty)."""
    seq = 0 if prev is None else prev.seq
    prev_hash = GENESIS_HASH if prev is None else prev.hash
    records = []
    for entry in entries:
        seq += 1
        digest = record_hash(prev_hash, seq, entry)
        records.append(AuditRecord(seq=seq, entry=entry, prev_hash=prev_hash, hash=digest))
        prev_hash = digest
    return records


def checkpoint_message(seq: int, hash: str) -> bytes:
    """What the audit key signs: the domain prefix, then ``<seq>:<hash>`` in ASCII."""
    _check_seq(seq)
    _check_hash("checkpoint hash", hash)
    return CHECKPOINT_DOMAIN + f"{seq}:{hash}".encode("ascii")


def make_checkpoint(signer: Signer, head: AuditRecord, at: datetime) -> AuditCheckpoint:
    """Sign the chain head ``head``."""
    _utc_iso(at)
    signature = signer.sign(checkpoint_message(head.seq, head.hash))
    return AuditCheckpoint(
        seq=head.seq,
        hash=head.hash,
        at=at,
        signature=signature,
        key_id=public_key_fingerprint(signer.public_key()),
    )


def verify_checkpoint(
    checkpoint: AuditCheckpoint, public_key: CertificatePublicKeyTypes
) -> bool:
    """True when ``checkpoint`` carries a valid signature by ``public_key``."""
    try:
        message = checkpoint_message(checkpoint.seq, checkpoint.hash)
    except (TypeError, ValueError):
        return False
    return verify_signature(public_key, checkpoint.signature, message)


@dataclass(frozen=True)
class ChainVerdict:
    """The result of ``verify_chain``.

    ``first_bad_seq`` is the first sequence number that can no longer be trusted; ``problem``
    says what was found, in words an operator can act on (empty when ``ok``); ``checked`` counts
    the records whose place in the chain was confirmed; ``last_checkpoint_seq`` is the newest
    checkpoint that was verified against the records.
    """

    ok: bool
    first_bad_seq: int | None
    problem: str
    checked: int
    last_checkpoint_seq: int | None
    # Something that may be tampering or may be innocent (the trail still verifies): said, not
    # failed, so that a scheduled check raises no false alarm.
    warning: str = ""

    def __post_init__(self) -> None:
        if self.ok and (self.first_bad_seq is not None or self.problem):
            raise ValueError("a passing verdict names no bad record and no problem")
        if not self.ok and not self.problem:
            raise ValueError("a failing verdict must say what is wrong")
        if self.checked < 0:
            raise ValueError("checked must be >= 0")


def _intact(record: AuditRecord, seq: int | None = None) -> bool:
    """True when the record's stored hash matches its content (taken at ``seq`` if given)."""
    try:
        return record_hash(record.prev_hash, record.seq if seq is None else seq, record.entry) == (
            record.hash
        )
    except (TypeError, ValueError):
        return False


def _diagnose(
    records: Sequence[AuditRecord], index: int, expected_seq: int, expected_prev: str
) -> tuple[int, str]:
    """Explain why ``records[index]`` does not follow the verified records before it.

    Returns the first untrustworthy sequence number and the problem in words. The checks go from
    the most specific explanation to the most general one ("edited").
    """
    record = records[index]
    following = records[index + 1] if index + 1 < len(records) else None

    if record.seq < expected_seq:
        # A sequence number already verified appears again: something was slipped in.
        return record.seq, f"record {record.seq} was inserted"
    if record.seq != expected_seq and any(r.seq == expected_seq for r in records[index + 1 :]):
        # The expected record is there, just further on: the records are out of order.
        low, high = sorted((expected_seq, record.seq))
        return low, f"records {low} and {high} are out of order"
    if record.seq > expected_seq:
        if record.seq == expected_seq + 1:
            return expected_seq, f"record {expected_seq} is missing"
        return expected_seq, f"records {expected_seq} to {record.seq - 1} are missing"

    # The sequence number is the expected one; look at the links.
    if (
        following is not None
        and record.prev_hash == following.hash
        and _intact(record, record.seq + 1)
        and _intact(following, following.seq - 1)
    ):
        # Two intact records that traded sequence numbers.
        return record.seq, f"records {record.seq} and {following.seq} are out of order"
    if following is not None and following.prev_hash == expected_prev:
        # The next record links straight to the verified part, skipping this one.
        return record.seq, f"record {record.seq} was inserted"
    before_previous = GENESIS_HASH if index < 2 else records[index - 2].hash
    if index >= 1 and record.prev_hash == before_previous and _intact(record, record.seq - 1):
        # This record was one number lower and links past its predecessor: the predecessor
        # was slipped in and everything after it renumbered.
        return record.seq - 1, f"record {record.seq - 1} was inserted"
    if record.prev_hash != expected_prev and _intact(record, record.seq + 1):
        # An intact record renumbered one down: the one it followed was deleted.
        return record.seq, f"record {record.seq} is missing"
    return record.seq, f"record {record.seq} was edited"


def verify_chain(
    records: Sequence[AuditRecord],
    checkpoints: Sequence[AuditCheckpoint],
    public_key: CertificatePublicKeyTypes | None = None,
    *,
    exported: AuditCheckpoint | None = None,
    every: int | None = None,
) -> ChainVerdict:
    """Check the whole audit trail: ``records`` from seq 1 in the order the store returned them,
    and every checkpoint against the audit key ``public_key`` (needed only if there are
    checkpoints).

    ``exported`` is a checkpoint the operator kept off the box (``gateway.audit_export``): it is
    checked like the registry's own, and names itself in the problem. ``every`` is the
    checkpoint interval the gateway signs at (``audit_checkpoint_every``): a trail longer than
    that without a single checkpoint gets a ``warning`` (its checkpoints may have been deleted;
    or no gateway has run here yet, since `fleetgate` commands on their own sign nothing).

    Detected: an edited record (its hash no longer matches), a deleted record (a gap in the
    sequence or a broken link), an inserted record, reordered records, a tail truncated behind a
    checkpoint (the checkpoint names a record that is gone), a chain rewritten consistently behind
    a checkpoint (the checkpoint's hash no longer matches), and a forged checkpoint signature.
    Warned of (given ``every``): an empty checkpoint table under a trail longer than one
    interval.

    Not detectable: records after the newest checkpoint can be truncated (or appended) by someone
    with write access to the database, because nothing signed vouches for them yet. That is why the
    service checkpoints often and on shutdown. Deleting the checkpoints together with the tail
    down to at most ``every`` records is caught only by an ``exported`` checkpoint: keep a copy of
    the newest one elsewhere (`fleetgate audit checkpoint --output FILE`).
    """
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError("every must be a whole number >= 1")
    labelled = [(checkpoint, "checkpoint") for checkpoint in checkpoints]
    if exported is not None:
        labelled.append((exported, "exported checkpoint"))
    # The registry's own first at equal seq: a problem there is the registry's to report.
    labelled.sort(key=lambda pair: (pair[0].seq, pair[1] != "checkpoint"))
    if labelled and public_key is None:
        raise TypeError("checkpoints can only be verified with the audit public key")
    for checkpoint, label in labelled:
        assert public_key is not None
        if not verify_checkpoint(checkpoint, public_key):
            return ChainVerdict(
                ok=False,
                first_bad_seq=checkpoint.seq,
                problem=f"{label} signature invalid (checkpoint at {checkpoint.seq})",
                checked=0,
                last_checkpoint_seq=None,
            )
    ordered_checkpoints = [checkpoint for checkpoint, _ in labelled]

    expected_prev = GENESIS_HASH
    hashes: dict[int, str] = {}
    for index, record in enumerate(records):
        expected_seq = index + 1
        if record.seq == expected_seq and record.prev_hash == expected_prev and _intact(record):
            hashes[record.seq] = record.hash
            expected_prev = record.hash
            continue
        bad_seq, problem = _diagnose(records, index, expected_seq, expected_prev)
        return ChainVerdict(
            ok=False,
            first_bad_seq=bad_seq,
            problem=problem,
            checked=min(index, bad_seq - 1),
            last_checkpoint_seq=_last_matching(ordered_checkpoints, hashes),
        )

    last_seq = len(records)
    anchored: int | None = None
    for checkpoint, label in labelled:
        if checkpoint.seq > last_seq:
            return ChainVerdict(
                ok=False,
                first_bad_seq=last_seq + 1,
                problem=(
                    f"{label} at {checkpoint.seq} names a record that is gone "
                    "(tail truncated)"
                ),
                checked=last_seq,
                last_checkpoint_seq=anchored,
            )
        if hashes[checkpoint.seq] != checkpoint.hash:
            # Every record is self-consistent yet the signed head differs: the chain was
            # recomputed after an edit somewhere after the last checkpoint that still matches.
            first_bad = 1 if anchored is None else anchored + 1
            return ChainVerdict(
                ok=False,
                first_bad_seq=first_bad,
                problem=(
                    f"{label} at {checkpoint.seq} does not match record {checkpoint.seq} "
                    f"(records {first_bad} to {checkpoint.seq} were rewritten)"
                ),
                checked=first_bad - 1,
                last_checkpoint_seq=anchored,
            )
        anchored = checkpoint.seq
    warning = ""
    if every is not None and not checkpoints and last_seq > every:
        # A running gateway signs once ``every`` records have passed (it looks every few
        # seconds) and at every shutdown, so such a trail may have lost its checkpoints. But
        # records written by `fleetgate` commands while no gateway ran, or in a gateway's first
        # seconds, are unsigned too: not proof, so a warning; an exported checkpoint decides.
        warning = (
            f"no checkpoint, yet the trail holds {last_seq} records and a running gateway signs "
            f"every {every}: if a gateway has run on this home, its checkpoints were deleted "
            "(check against an exported checkpoint: fleetgate audit verify --checkpoint FILE)"
        )
    return ChainVerdict(
        ok=True,
        first_bad_seq=None,
        problem="",
        checked=last_seq,
        last_checkpoint_seq=anchored,
        warning=warning,
    )


def _last_matching(
    checkpoints: Sequence[AuditCheckpoint], hashes: dict[int, str]
) -> int | None:
    matching = [cp.seq for cp in checkpoints if hashes.get(cp.seq) == cp.hash]
    return max(matching) if matching else None


class AuditWriter:
    """Appends audit events and signs a checkpoint every ``every`` records.

    The stores append the events of ``put_identity``, ``record_outcome`` and ``change_state``
    in the same transaction as the change, outside this writer; the service therefore also calls
    ``maybe_checkpoint()`` periodically and ``checkpoint()`` on shutdown. Both read only the
    chain head (``Store.audit_head``, one indexed query), so calling them often costs little
    however long the trail grows.
    """

    def __init__(self, store: Store, signer: Signer, clock: Clock, every: int = 100) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError("every must be an int")
        if every < 1:
            raise ValueError("every must be >= 1")
        self._store = store
        self._signer = signer
        self._clock = clock
        self._every = every
        self._lock = threading.Lock()
        self._checkpointed: int | None = None  # seq of the newest checkpoint, loaded lazily

    def log(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Append ``entries`` and sign a checkpoint if ``every`` records have passed since the
        last one."""
        records = self._store.append_audit(entries)
        self.maybe_checkpoint()
        return records

    def maybe_checkpoint(self) -> AuditCheckpoint | None:
        """Sign the head if at least ``every`` records follow the newest checkpoint."""
        with self._lock:
            head = self._store.audit_head()
            if head is None or head.seq - self._last_checkpointed() < self._every:
                return None
            return self._sign(head)

    def checkpoint(self) -> AuditCheckpoint | None:
        """Sign the current head now (unless it is already signed or the trail is empty)."""
        with self._lock:
            head = self._store.audit_head()
            if head is None or head.seq <= self._last_checkpointed():
                return None
            return self._sign(head)

    def _last_checkpointed(self) -> int:
        if self._checkpointed is None:
            existing = self._store.checkpoints()
            self._checkpointed = max((cp.seq for cp in existing), default=0)
        return self._checkpointed

    def _sign(self, head: AuditRecord) -> AuditCheckpoint | None:
        checkpoint = make_checkpoint(self._signer, head, self._clock.now())
        try:
            self._store.put_checkpoint(checkpoint)
        except DuplicateError:
            # Another gateway sharing the database signed the same head first; that is enough.
            self._checkpointed = head.seq
            return None
        self._checkpointed = head.seq
        return checkpoint
