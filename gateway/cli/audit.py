"""`fleetgate audit verify|tail`: prove the trail is intact, read its recent events."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from gateway.audit import verify_chain
from gateway.cli.common import (
    HomeOption,
    JsonOption,
    console,
    err_console,
    print_json,
    settings_for,
)
from gateway.home import load_audit_public_key
from gateway.operations import open_store

app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)


@app.command("verify")
def verify_command(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Exit 0 if no record was edited, dropped, inserted or reordered; else 1 naming the first."""
    settings = settings_for(home)
    store = open_store(settings)
    verdict = verify_chain(
        store.audit_records(), store.checkpoints(), load_audit_public_key(settings)
    )
    if as_json:
        print_json(
            {
                "ok": verdict.ok,
                "checked": verdict.checked,
                "first_bad_seq": verdict.first_bad_seq,
                "problem": verdict.problem,
                "last_checkpoint_seq": verdict.last_checkpoint_seq,
            }
        )
    elif verdict.ok:
        console.print(
            f"[green]audit trail intact[/]: {verdict.checked} records, "
            f"last signed checkpoint at {verdict.last_checkpoint_seq}"
        )
    else:
        err_console.print(f"[bold red]audit trail broken[/]: {verdict.problem}")
    raise typer.Exit(0 if verdict.ok else 1)


@app.command("tail")
def tail_command(
    home: HomeOption = None,
    count: Annotated[int, typer.Option("-n", "--count", help="How many events.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show the most recent audit events."""
    store = open_store(settings_for(home))
    records = store.audit_records()[-count:]
    if as_json:
        print_json(
            [
                {
                    "seq": r.seq,
                    "at": r.entry.at.isoformat(),
                    "actor": r.entry.actor,
                    "action": r.entry.action,
                    "subject": r.entry.subject,
                    "outcome": r.entry.outcome,
                    "reasons": list(r.entry.reasons),
                    "hash": r.hash,
                }
                for r in records
            ]
        )
        return
    table = Table(title="audit trail")
    for column in ("seq", "at", "actor", "action", "subject", "outcome", "reasons"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r.seq),
            r.entry.at.isoformat(timespec="seconds"),
            r.entry.actor,
            r.entry.action,
            r.entry.subject,
            r.entry.outcome,
            ", ".join(r.entry.reasons),
        )
    console.print(table)
