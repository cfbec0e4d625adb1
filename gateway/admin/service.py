"""The admin API's core: one request in, one reply out, no sockets.

``AdminService.handle(topic, payload)`` answers a request published on
``fg/v1/admin/<operator>/req``. It never raises: bad input, a missing right, an unknown
identity or a database that is down all become an error reply with a stable reason code
(``wire.AdminReason``), and each is counted in ``metrics``.

Who asks is the topic's operator name (the broker lets an operator publish only to its own
request topic); what that operator may do is looked up in the registry on every request, so a
role change or a revocation takes effect at once. Refusals for want of a role are audited, as
is every change (by ``gateway.operations``, with the actor ``operator:<name>``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from gateway.admin import views
from gateway.admin.args import RequestArgs
from gateway.admin.backend import AdminBackend
from gateway.admin.events import EventRelay
from gateway.admin.roles import ALL_OPS, Role, may, parse_role, required_role
from gateway.admin.telemetry import TelemetryCounter
from gateway.admin.wire import (
    AdminReason,
    AdminRequest,
    AdminRequestError,
    error_reply,
    ok_reply,
    operator_of,
    parse_request,
    response_topic,
)
from gateway.audit import verify_chain
from gateway.cluster.errors import ClusterError, ClusterReason
from gateway.metrics_export import MetricsSnapshot, copy_counts
from gateway.operations import OperationError, OperationRefusal
from gateway.store import AuditEntry, IdentityRecord, IdentityState, StoreError
from gateway.transport import Outgoing
from pki.profile import IdentityKind, is_identity_name

log = logging.getLogger(__name__)

MAX_REASON = 500
DEFAULT_AUDIT_LIMIT = 500
MAX_AUDIT_LIMIT = 10_000
MAX_HISTORY = 500
MAX_UNKNOWN = 200
EXPIRING_WITHIN = timedelta(minutes=10)
EXPIRING_FRACTION = 1 / 3
# Forbidden bulk requests are audited once per target, up to this many.
MAX_AUDITED_TARGETS = 100


@dataclass(frozen=True)
class Caller:
    """The operator behind one request, as the registry knows it now."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"operator:{self.name}"


_Op = Callable[[Caller, RequestArgs], dict[str, Any]]


def _refusal_reason(exc: OperationError) -> str:
    if exc.reason is OperationRefusal.UNKNOWN_IDENTITY:
        return AdminReason.NOT_FOUND.value
    return str(exc.reason)


def _cluster_reason(exc: ClusterError) -> AdminReason:
    """A gateway of a cluster that could not get a change confirmed: recorded but not yet in
    force, or (any other cluster reason) the cluster is not in a state to serve it."""
    if exc.reason is ClusterReason.NOT_ENFORCED:
        return AdminReason.NOT_ENFORCED
    return AdminReason.UNAVAILABLE


def _item_error(identity_id: str, reason: str, detail: str) -> dict[str, Any]:
    return {"id": identity_id, "ok": False, "error": {"reason": reason, "detail": detail}}


class AdminService:
    """Answers admin requests. ``metrics`` counts ``requests``, ``ok.<op>`` and
    ``rejected.<reason>``; ``ignored.topic`` for messages on a topic that names no operator.

    ``audit_every`` is the interval the gateway signs audit checkpoints at
    (``audit_checkpoint_every``): given, the ``audit`` op also reports a trail longer than that
    without a single checkpoint (the checkpoints were deleted)."""

    def __init__(
        self,
        backend: AdminBackend,
        *,
        telemetry: TelemetryCounter | None = None,
        events: EventRelay | None = None,
        audit_every: int | None = None,
    ) -> None:
        if audit_every is not None and (
            isinstance(audit_every, bool) or not isinstance(audit_every, int) or audit_every < 1
        ):
            raise ValueError("audit_every must be a whole number >= 1")
        self._backend = backend
        self._audit_every = audit_every
        self._store = backend.store
        self._clock = backend.clock
        self.telemetry = telemetry if telemetry is not None else TelemetryCounter(self._clock)
        self.events = events if events is not None else EventRelay(None)
        self.metrics: Counter[str] = Counter()
        self._certificates = views.CurrentCertificates(self._store)
        self._ops: dict[str, tuple[frozenset[str], _Op]] = {
            "whoami": (frozenset(), self._whoami),
            "list_identities": (
                frozenset({"kind", "state", "limit", "offset"}),
                self._list_identities,
            ),
            "get_identity": (frozenset({"id"}), self._get_identity),
            "audit": (
                frozenset({"actor", "subject", "action", "since", "until", "limit"}),
                self._audit,
            ),
            "attention": (frozenset(), self._attention),
            "operators": (frozenset(), self._operators),
            "metrics": (frozenset(), self._metrics),
            "approve": (frozenset({"ids", "reason"}), self._approve),
            "quarantine": (frozenset({"ids", "reason"}), self._quarantine),
            "release": (frozenset({"ids", "reason"}), self._release),
            "revoke": (frozenset({"ids", "reason"}), self._revoke),
            "set_role": (frozenset({"name", "role"}), self._set_role),
            "revoke_operator": (frozenset({"name", "reason"}), self._revoke_operator),
        }
        assert set(self._ops) == ALL_OPS

    # -- the wire ------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Answer one request: ``[]`` for a topic that names no operator, otherwise exactly one
        reply on that operator's response topic. Never raises."""
        name = operator_of(topic)
        if name is None:
            self.metrics["ignored.topic"] += 1
            return []
        self.metrics["requests"] += 1
        request_id: str | None = None
        try:
            request = parse_request(payload)
            request_id = request.id
            body = ok_reply(request.id, self._serve(name, request))
        except AdminRequestError as exc:
            self.metrics[f"rejected.{exc.reason}"] += 1
            body = error_reply(exc.request_id or request_id, exc.reason, exc.detail)
        except StoreError as exc:
            self.metrics[f"rejected.{AdminReason.UNAVAILABLE}"] += 1
            body = error_reply(request_id, AdminReason.UNAVAILABLE, f"registry: {exc}")
        except TimeoutError:
            self.metrics[f"rejected.{AdminReason.UNAVAILABLE}"] += 1
            body = error_reply(
                request_id, AdminReason.UNAVAILABLE, "the broker did not confirm in time"
            )
        except ClusterError as exc:
            reason = _cluster_reason(exc)
            self.metrics[f"rejected.{reason}"] += 1
            body = error_reply(request_id, reason, exc.detail or str(exc))
        except Exception:  # the last line of defence: a bug must not stop the gateway
            self.metrics[f"rejected.{AdminReason.INTERNAL}"] += 1
            log.exception("admin request from %s failed", name)
            body = error_reply(request_id, AdminReason.INTERNAL, "internal error")
        return [Outgoing(response_topic(name), body, qos=1)]

    def _serve(self, name: str, request: AdminRequest) -> dict[str, Any]:
        entry = self._ops.get(request.op)
        if entry is None:
            raise AdminRequestError(
                AdminReason.UNKNOWN_OP, f"unknown op {request.op[:64]!r}", request.id
            )
        allowed, run = entry
        caller = self._authorize(name, request)
        result = run(caller, RequestArgs(request, allowed))
        self.metrics[f"ok.{request.op}"] += 1
        return result

    def _authorize(self, name: str, request: AdminRequest) -> Caller:
        record = self._store.get_identity(name)
        role = parse_role(record.role) if record is not None else None
        if record is None or record.kind is not IdentityKind.OPERATOR:
            why = f"{name} is not an operator"
        elif record.state is not IdentityState.ACTIVE:
            why = f"operator {name} is {record.state.value}"
        elif role is None:
            why = f"operator {name} has no valid role"
        elif not may(role, request.op):
            why = f"{request.op} needs the {required_role(request.op).value} role; {name} is {role}"
        else:
            return Caller(name, role)
        self._audit_forbidden(name, role, request, why)
        raise AdminRequestError(AdminReason.FORBIDDEN, why, request.id)

    def _audit_forbidden(
        self, name: str, role: Role | None, request: AdminRequest, why: str
    ) -> None:
        now = self._clock.now()
        targets = _targets(request.args) or [name]
        entries = [
            AuditEntry(
                actor=f"operator:{name}",
                action=request.op,
                subject=target,
                outcome="rejected",
                at=now,
                reasons=(AdminReason.FORBIDDEN.value,),
                detail={"role": role.value if role else "none", "why": why, "via": "admin_api"},
            )
            for target in targets[:MAX_AUDITED_TARGETS]
        ]
        self._store.append_audit(entries)

    def _audit_rejected(
        self, caller: Caller, action: str, subject: str, reason: str, detail: str
    ) -> None:
        """A change an operator asked for and did not get (not found, wrong state...)."""
        entry = AuditEntry(
            actor=caller.actor,
            action=action,
            subject=subject,
            outcome="rejected",
            at=self._clock.now(),
            reasons=(reason,),
            detail={"why": detail[:MAX_REASON], "via": "admin_api"},
        )
        self._store.append_audit([entry])

    # -- reading -------------------------------------------------------------------------------

    def _whoami(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        return {"operator": caller.name, "role": caller.role.value}

    def _rows(
        self, records: Sequence[IdentityRecord], connected: frozenset[str]
    ) -> list[dict[str, Any]]:
        self._certificates.refresh(records)
        return [
            views.identity_row(
                record,
                connected=record.id in connected,
                certificate=self._certificates(record),
            )
            for record in records
        ]

    def _list_identities(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        kind = args.choice("kind", IdentityKind)
        state = args.choice("state", IdentityState)
        limit = args.integer("limit", default=1_000_000, low=1, high=1_000_000)
        offset = args.integer("offset", default=0, low=0, high=1_000_000_000)
        records = sorted(self._store.list_identities(kind=kind, state=state), key=lambda r: r.id)
        if kind is None and state is None:
            self._certificates.forget_others(r.id for r in records)
        page = records[offset : offset + limit]
        return {"identities": self._rows(page, self._backend.connected()), "total": len(records)}

    def _get_identity(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        identity_id = args.name("id")
        record = self._store.get_identity(identity_id)
        if record is None:
            raise AdminRequestError(
                AdminReason.NOT_FOUND, f"no identity {identity_id!r}", args.request_id
            )
        certificates = self._store.certificates_for(identity_id)
        row = views.identity_row(
            record,
            connected=identity_id in self._backend.connected(),
            certificate=views.current_certificate(certificates),
        )
        history = [r for r in self._store.audit_records() if r.entry.subject == identity_id]
        rate = self.telemetry.rate(identity_id)
        return {
            **row,
            "created_at": record.created_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
            "reattest_required": record.reattest_required,
            "certificates": [
                views.certificate_json(c)
                for c in sorted(certificates, key=lambda c: (c.issued_at, c.serial), reverse=True)
            ],
            "history": [views.audit_json(r) for r in reversed(history[-MAX_HISTORY:])],
            "attestation": views.attestation(record),
            "telemetry": {"per_minute": list(rate.per_minute), "total": rate.total},
        }

    def _audit(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        actor = args.text("actor")
        subject = args.text("subject")
        action = args.text("action")
        since = args.time("since")
        until = args.time("until")
        limit = args.integer("limit", default=DEFAULT_AUDIT_LIMIT, low=1, high=MAX_AUDIT_LIMIT)
        records = self._store.audit_records()
        matching = [
            r
            for r in records
            if (actor is None or r.entry.actor == actor)
            and (subject is None or r.entry.subject == subject)
            and (action is None or r.entry.action == action)
            and (since is None or r.entry.at >= since)
            and (until is None or r.entry.at <= until)
        ]
        return {
            "records": [views.audit_json(r) for r in reversed(matching[-limit:])],
            "total": len(matching),
            "verified": self._verify(records),
        }

    def _verify(self, records: Sequence[Any]) -> dict[str, Any]:
        key = self._backend.audit_public_key()
        try:
            verdict = verify_chain(
                records, self._store.checkpoints(), key, every=self._audit_every
            )
        except TypeError:  # checkpoints exist but no key to check them with
            return {
                "ok": False,
                "problem": "the audit public key is not available here",
                "checked": 0,
                "last_checkpoint_seq": None,
            }
        return {
            "ok": verdict.ok,
            "problem": verdict.problem,
            "checked": verdict.checked,
            "last_checkpoint_seq": verdict.last_checkpoint_seq,
            "warning": verdict.warning,
        }

    def _attention(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        now = self._clock.now()
        devices = sorted(self._store.list_identities(kind=IdentityKind.DEVICE), key=lambda r: r.id)
        expiring: list[tuple[datetime, str]] = []
        active = [r for r in devices if r.state is IdentityState.ACTIVE]
        self._certificates.refresh(active)
        for record in active:
            cert = self._certificates(record)
            if cert is None:
                continue
            # The smaller of the two: a healthy device renews at about two thirds of its
            # lifetime, so only one whose renewal is overdue shows up here.
            window = min(EXPIRING_WITHIN, (cert.not_after - cert.issued_at) * EXPIRING_FRACTION)
            if cert.not_after - now <= window:
                expiring.append((cert.not_after, record.id))
        return {
            "pending": [r.id for r in devices if r.state is IdentityState.PENDING],
            "expiring": [identity_id for _, identity_id in sorted(expiring)],
            "quarantined": [r.id for r in devices if r.state is IdentityState.QUARANTINED],
            "events": [e.as_json() for e in self.events.recent()],
            "unknown": [views.refusal_json(r) for r in self._store.refusals(limit=MAX_UNKNOWN)],
        }

    def _operators(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        records = sorted(
            self._store.list_identities(kind=IdentityKind.OPERATOR), key=lambda r: r.id
        )
        rows = self._rows(records, self._backend.connected())
        for row, record in zip(rows, records, strict=True):
            row["created_at"] = record.created_at.isoformat()
        return {"operators": rows}

    def _metrics(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        return self.snapshot().as_json()

    def snapshot(self) -> MetricsSnapshot:
        """The counters of the gateway this service runs in, and the admin API's own (its
        event relay's prefixed ``events.``): what the ``metrics`` op answers and what the
        gateway writes to its metrics file. Callable from any thread."""
        admin = copy_counts(self.metrics)
        admin.update({f"events.{k}": v for k, v in copy_counts(self.events.metrics).items()})
        return MetricsSnapshot(
            node=self._backend.node(),
            at=self._clock.now(),
            sections={**self._backend.counters(), "admin": admin},
        )

    # -- acting on devices ---------------------------------------------------------------------

    def _bulk(
        self,
        caller: Caller,
        op: str,
        ids: list[str],
        act: Callable[[str], IdentityRecord],
    ) -> dict[str, Any]:
        """Run ``act`` per device; one failure never hides the others' results."""
        results: list[dict[str, Any]] = []
        for identity_id in ids:
            record = self._store.get_identity(identity_id)
            if record is None:
                reason, detail = AdminReason.NOT_FOUND.value, f"no identity {identity_id!r}"
            elif record.kind is not IdentityKind.DEVICE:
                reason = AdminReason.WRONG_KIND.value
                detail = f"{identity_id} is a {record.kind.value}, not a device"
            else:
                try:
                    changed = act(identity_id)
                except OperationError as exc:
                    reason, detail = _refusal_reason(exc), exc.detail
                except TimeoutError:
                    reason = AdminReason.UNAVAILABLE.value
                    detail = "the broker did not confirm in time"
                except ClusterError as exc:
                    # a follower whose change no leader confirmed: recorded, not yet in force
                    reason, detail = _cluster_reason(exc).value, exc.detail or str(exc)
                else:
                    results.append({"id": identity_id, "ok": True, "state": changed.state.value})
                    continue
            self._audit_rejected(caller, op, identity_id, reason, detail)
            results.append(_item_error(identity_id, reason, detail))
        failed = sum(1 for r in results if not r["ok"])
        return {"results": results, "succeeded": len(results) - failed, "failed": failed}

    def _approve(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        ids = args.ids()
        args.text("reason", limit=MAX_REASON)
        return self._bulk(
            caller, "approve", ids, lambda i: self._backend.approve(i, actor=caller.actor)
        )

    def _change(
        self,
        caller: Caller,
        args: RequestArgs,
        op: str,
        state: IdentityState,
        *,
        reason_required: bool,
    ) -> dict[str, Any]:
        ids = args.ids()
        reason = args.text("reason", required=reason_required, limit=MAX_REASON) or ""
        return self._bulk(
            caller,
            op,
            ids,
            lambda i: self._backend.set_state(
                i, state, action=op, actor=caller.actor, reason=reason
            ),
        )

    def _quarantine(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        return self._change(
            caller, args, "quarantine", IdentityState.QUARANTINED, reason_required=True
        )

    def _release(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        return self._change(caller, args, "release", IdentityState.ACTIVE, reason_required=False)

    def _revoke(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        return self._change(caller, args, "revoke", IdentityState.REVOKED, reason_required=True)

    # -- acting on operators -------------------------------------------------------------------

    def _other_operator(self, caller: Caller, args: RequestArgs, op: str) -> IdentityRecord:
        name = args.name("name")
        if name == caller.name:
            raise AdminRequestError(
                AdminReason.SELF_ACTION,
                f"{op} on yourself is refused; ask another admin or use the fleetgate CLI",
                args.request_id,
            )
        record = self._store.get_identity(name)
        if record is None:
            raise AdminRequestError(AdminReason.NOT_FOUND, f"no operator {name!r}", args.request_id)
        if record.kind is not IdentityKind.OPERATOR:
            detail = f"{name} is a {record.kind.value}, not an operator"
            raise AdminRequestError(AdminReason.WRONG_KIND, detail, args.request_id)
        return record

    def _set_role(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        role: Role = args.choice("role", Role, required=True)
        record = self._other_operator(caller, args, "set_role")
        if record.state is IdentityState.REVOKED:
            detail = f"operator {record.id} is revoked"
            raise AdminRequestError(AdminReason.TRANSITION_FORBIDDEN, detail, args.request_id)
        now = self._clock.now()
        entry = AuditEntry(
            actor=caller.actor,
            action="set_role",
            subject=record.id,
            outcome="ok",
            at=now,
            detail={"from": record.role or "none", "to": role.value},
        )
        self._store.put_identity(replace(record, role=role.value, updated_at=now), audit=[entry])
        return {"name": record.id, "role": role.value}

    def _revoke_operator(self, caller: Caller, args: RequestArgs) -> dict[str, Any]:
        reason = args.text("reason", required=True, limit=MAX_REASON) or ""
        record = self._other_operator(caller, args, "revoke_operator")
        try:
            changed = self._backend.set_state(
                record.id,
                IdentityState.REVOKED,
                action="revoke_operator",
                actor=caller.actor,
                reason=reason,
            )
        except OperationError as exc:
            raise AdminRequestError(
                _refusal_reason(exc), exc.detail, args.request_id
            ) from None
        except ClusterError as exc:
            raise AdminRequestError(
                _cluster_reason(exc), exc.detail or str(exc), args.request_id
            ) from None
        return {"name": changed.id, "state": changed.state.value}


def _targets(args: Mapping[str, Any]) -> list[str]:
    """The identities a request is about, read leniently (for the audit of a refusal)."""
    found: list[str] = []
    ids = args.get("ids")
    if isinstance(ids, list):
        found.extend(i for i in ids if is_identity_name(i))
    for key in ("id", "name"):
        value = args.get(key)
        if isinstance(value, str) and is_identity_name(value):
            found.append(value)
    return list(dict.fromkeys(found))
