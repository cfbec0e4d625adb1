"""`fleetgate device ...`: list, show and approve identities in the registry."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gateway.cli.common import HomeOption, JsonOption, console, fail, print_json, settings_for
from gateway.operations import OperationError, approve, change_state, cli_actor, open_store
from gateway.store import AuditRecord, IdentityRecord, IdentityState

app = typer.Typer(help="Inspect and manage identities.", no_args_is_help=True)


def _identity_json(record: IdentityRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "kind": record.kind.value,
        "state": record.state.value,
        "manufacturer": record.manufacturer,
        "model": record.model,
        "firmware_version": record.firmware_version,
        "firmware_digest": record.firmware_digest,
        "birth_fingerprint": record.birth_fingerprint,
        "role": record.role,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "last_seen_at": record.last_seen_at.isoformat() if record.last_seen_at else None,
    }


def _countdown(when: datetime) -> str:
    seconds = int((when - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


@app.command("list")
def list_command(
    home: HomeOption = None,
    state: Annotated[IdentityState | None, typer.Option(help="Only this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List identities with their state and current certificate."""
    store = open_store(settings_for(home))
    records = store.list_identities(state=state)
    if as_json:
        rows = []
        for record in records:
            row = _identity_json(record)
            active = [c for c in store.certificates_for(record.id) if c.status == "active"]
            row["certificate_not_after"] = active[-1].not_after.isoformat() if active else None
            rows.append(row)
        print_json(rows)
        return
    table = Table(title=f"{len(records)} identities")
    for column in ("id", "kind", "state", "model", "firmware", "cert expires", "last seen"):
        table.add_column(column)
    for record in records:
        active = [c for c in store.certificates_for(record.id) if c.status == "active"]
        table.add_row(
            record.id,
            record.kind.value,
            record.state.value,
            record.model or "",
            record.firmware_version or "",
            _countdown(active[-1].not_after) if active else "-",
            record.last_seen_at.strftime("%H:%M:%S") if record.last_seen_at else "-",
        )
    console.print(table)


@app.command("show")
def show_command(device_id: str, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Show one identity: attestation facts, certificates and its audit history."""
    store = open_store(settings_for(home))
    record = store.get_identity(device_id)
    if record is None:
        fail(f"no identity {device_id!r}")
    certificates = store.certificates_for(device_id)
    history = [r for r in store.audit_records() if r.entry.subject == device_id]
    if as_json:
        data = _identity_json(record)
        data["certificates"] = [
            {
                "serial": f"{c.serial:x}",
                "status": c.status.value,
                "not_before": c.not_before.isoformat(),
                "not_after": c.not_after.isoformat(),
            }
            for c in certificates
        ]
        data["history"] = [
            {
                "seq": r.seq,
                "at": r.entry.at.isoformat(),
                "actor": r.entry.actor,
                "action": r.entry.action,
                "outcome": r.entry.outcome,
                "reasons": list(r.entry.reasons),
            }
            for r in history
        ]
        data["detections"] = [_detection_json(r) for r in history if r.entry.action == "anomaly"]
        print_json(data)
        return
    console.print(f"[bold]{record.id}[/]  {record.kind.value}  state [bold]{record.state.value}[/]")
    seen = record.last_seen_at
    for label, value in (
        ("manufacturer", record.manufacturer),
        ("model", record.model),
        ("firmware", f"{record.firmware_version} {record.firmware_digest or ''}".strip()),
        ("birth cert", record.birth_fingerprint),
        ("enrolled", record.created_at.isoformat(timespec="seconds")),
        ("last seen", seen.isoformat(timespec="seconds") if seen else None),
    ):
        console.print(f"  {label:<13}{value or '-'}")
    table = Table(title="certificates")
    for column in ("serial", "status", "not before", "not after"):
        table.add_column(column)
    for cert in certificates:
        table.add_row(
            f"{cert.serial:x}"[:16] + "…",
            cert.status.value,
            cert.not_before.isoformat(timespec="seconds"),
            cert.not_after.isoformat(timespec="seconds"),
        )
    console.print(table)
    events = Table(title="history")
    for column in ("seq", "at", "actor", "action", "outcome", "reasons"):
        events.add_column(column)
    for r in history[-30:]:
        events.add_row(
            str(r.seq),
            r.entry.at.isoformat(timespec="seconds"),
            r.entry.actor,
            r.entry.action,
            r.entry.outcome,
            ", ".join(r.entry.reasons),
        )
    console.print(events)
    detections = [r for r in history if r.entry.action == "anomaly"]
    if detections:
        found = Table(title="detections (behaviour watch)")
        for column in ("at", "detection", "score", "action", "reason"):
            found.add_column(column)
        for r in detections[-20:]:
            d = _detection_json(r)
            found.add_row(d["at"], d["detection"], d["score"], d["action"], d["reason"])
        console.print(found)


def _detection_json(record: AuditRecord) -> dict[str, str]:
    """An anomaly verdict from the audit trail (``gateway.watch`` writes them)."""
    entry = record.entry
    reasons = entry.reasons
    return {
        "at": entry.at.isoformat(timespec="seconds"),
        "detection": entry.detail.get("detection", reasons[0] if reasons else ""),
        "score": entry.detail.get("score", ""),
        "action": entry.outcome,
        "rule": entry.detail.get("rule", ""),
        "reason": reasons[1] if len(reasons) > 1 else "",
        "evidence": ", ".join(
            f"{key.removeprefix('evidence.')}={value}"
            for key, value in entry.detail.items()
            if key.startswith("evidence.")
        ),
    }


@app.command("approve")
def approve_command(device_id: str, home: HomeOption = None) -> None:
    """Approve a pending device: its next enrollment retry gets a certificate."""
    store = open_store(settings_for(home))
    try:
        record = approve(store, device_id, actor=cli_actor())
    except OperationError as exc:
        fail(str(exc))
    console.print(f"[green]approved[/] {record.id} (state {record.state.value})")


def _act(
    home: Path | None, device_id: str, state: IdentityState, action: str, reason: str
) -> None:
    store = open_store(settings_for(home))
    try:
        record = change_state(
            store, device_id, state, action=action, actor=cli_actor(), reason=reason
        )
    except OperationError as exc:
        fail(str(exc))
    # The running gateway notices the audit event within ~200 ms and enforces it on the broker.
    console.print(f"[green]{action}[/] {record.id}: now {record.state.value}")


def _required_reason(reason: str) -> str:
    """An audit entry that says nothing of why a device was cut off is no record at all."""
    if not reason.strip():
        raise typer.BadParameter("must not be empty: say why, it is kept in the audit trail")
    return reason.strip()


RequiredReason = Annotated[
    str, typer.Option(help="Why; kept in the audit trail.", callback=_required_reason)
]


@app.command("quarantine")
def quarantine_command(
    device_id: str,
    reason: RequiredReason,
    home: HomeOption = None,
) -> None:
    """Restrict a device to its quarantine topics; it stays connected and gets no renewal."""
    _act(home, device_id, IdentityState.QUARANTINED, "quarantine", reason)


@app.command("release")
def release_command(
    device_id: str,
    reason: Annotated[str, typer.Option(help="Why; kept in the audit trail.")] = "",
    home: HomeOption = None,
) -> None:
    """Give a quarantined device its rights back."""
    _act(home, device_id, IdentityState.ACTIVE, "release", reason)


@app.command("revoke")
def revoke_command(
    device_id: str,
    reason: RequiredReason,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    home: HomeOption = None,
) -> None:
    """Revoke for good: certificates on the CRL, session cut, reconnect and renewal refused."""
    if not yes and not typer.confirm(
        f"Revoke {device_id}? This is final: the device must be replaced or re-provisioned.",
        default=False,
    ):
        fail("not revoked", code=1)
    _act(home, device_id, IdentityState.REVOKED, "revoke", reason)
