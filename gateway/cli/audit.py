"""`fleetgate audit verify|checkpoint|tail`: prove the trail is intact, export its newest signed
checkpoint for safekeeping off the box, read its recent events."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from gateway.audit import ChainVerdict, verify_chain, verify_checkpoint
from gateway.audit_export import (
    MAX_DOCUMENT_CHARS,
    CheckpointFileError,
    checkpoint_from_json,
    checkpoint_to_json,
)
from gateway.cli.common import (
    HomeOption,
    JsonOption,
    console,
    err_console,
    fail,
    print_json,
    settings_for,
)
from gateway.files import write_atomic
from gateway.home import load_audit_public_key
from gateway.operations import open_store
from gateway.store import AuditCheckpoint

app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)

CheckpointFileOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="A checkpoint exported by `fleetgate audit checkpoint`, kept off the box: the "
        "trail must still reach it and match its signed head.",
        show_default=False,
    ),
]


@app.command("verify")
def verify_command(
    home: HomeOption = None, checkpoint: CheckpointFileOption = None, as_json: JsonOption = False
) -> None:
    """Exit 0 if no record was edited, dropped, inserted or reordered; else 1 naming the first."""
    settings = settings_for(home)
    exported = None
    if checkpoint is not None:
        try:
            # read no more than a document can hold: a huge file is refused, not loaded
            with checkpoint.open(encoding="utf-8") as handle:
                exported = checkpoint_from_json(handle.read(MAX_DOCUMENT_CHARS + 1))
        except (OSError, UnicodeDecodeError, CheckpointFileError) as exc:
            _report_unreadable(checkpoint, exc, as_json)
    store = open_store(settings)
    verdict = verify_chain(
        store.audit_records(),
        store.checkpoints(),
        load_audit_public_key(settings),
        exported=exported,
        every=settings.audit_checkpoint_every,
    )
    if as_json:
        print_json(_verdict_json(verdict))
    elif verdict.ok:
        against = f"; matches the exported checkpoint at {exported.seq}" if exported else ""
        console.print(
            f"[green]audit trail intact[/]: {verdict.checked} records, "
            f"last signed checkpoint at {verdict.last_checkpoint_seq}{against}"
        )
        if verdict.warning:
            err_console.print(f"[bold yellow]warning:[/] {escape(verdict.warning)}")
    else:
        err_console.print(f"[bold red]audit trail broken[/]: {verdict.problem}")
    raise typer.Exit(0 if verdict.ok else 1)


def _verdict_json(verdict: ChainVerdict) -> dict[str, object]:
    return {
        "ok": verdict.ok,
        "checked": verdict.checked,
        "first_bad_seq": verdict.first_bad_seq,
        "problem": verdict.problem,
        "last_checkpoint_seq": verdict.last_checkpoint_seq,
        "warning": verdict.warning,
    }


def _report_unreadable(path: Path, error: Exception, as_json: bool) -> NoReturn:
    """An exported checkpoint that cannot be read proves nothing: the check fails (exit 1)."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    problem = f"cannot use the exported checkpoint {path}: {reason}"
    if as_json:
        verdict = ChainVerdict(
            ok=False, first_bad_seq=None, problem=problem, checked=0, last_checkpoint_seq=None
        )
        print_json(_verdict_json(verdict))
        raise typer.Exit(1)
    fail(escape(problem))


@app.command("checkpoint")
def checkpoint_command(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the checkpoint (JSON); copy it off this machine.",
            show_default=False,
        ),
    ],
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export the newest signed checkpoint, for `fleetgate audit verify --checkpoint FILE`.

    The registry keeps its checkpoints beside the records: whoever can delete one can delete
    the other. A copy stored elsewhere still proves how far the trail reached and what its
    head was. Needs no passphrase: it copies a signature, it does not make one."""
    settings = settings_for(home)
    checkpoints = open_store(settings).checkpoints()
    if not checkpoints:
        fail(
            "no signed checkpoint yet: a running gateway signs the trail's head every few "
            "seconds once enough records have passed, and always when it stops"
        )
    newest = max(checkpoints, key=lambda checkpoint: checkpoint.seq)
    if not verify_checkpoint(newest, load_audit_public_key(settings)):
        # Exported, it would make every later check fail; the operator must know now.
        fail(
            f"the newest checkpoint (at {newest.seq}) is not signed by this home's audit key: "
            "run `fleetgate audit verify`"
        )
    try:
        # replaced whole: a crash never leaves half a checkpoint where the last good one was;
        # readable by all, as before: it holds a signature and a hash, nothing secret
        write_atomic(output, checkpoint_to_json(newest).encode("utf-8"), 0o644, suffix=".partial")
    except OSError as exc:
        fail(escape(f"cannot write {output}: {exc.strerror or exc}"))
    _report_export(newest, output, as_json)


def _report_export(checkpoint: AuditCheckpoint, output: Path, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "output": str(output),
                "seq": checkpoint.seq,
                "hash": checkpoint.hash,
                "at": checkpoint.at.isoformat(),
            }
        )
        return
    console.print(
        f"checkpoint at record {checkpoint.seq} (signed {checkpoint.at.isoformat()}) written "
        f"to {escape(str(output))}: keep it off this machine"
    )


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
