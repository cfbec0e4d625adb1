"""`fleetgate console`: the operator console (PySide6), connected through an operator profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import err_console, fail


def console_command(
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="Operator profile written by `fleetgate operator add` "
            "(default: $FLEETGATE_PROFILE or ~/.config/fleetgate/console.json).",
            show_default=False,
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            help="File holding the profile passphrase (default: ask in a dialog).",
            show_default=False,
        ),
    ] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option(
            "--screenshot",
            help="Open the window, wait for the fleet to load, save it as this PNG and exit "
            "(works offscreen: QT_QPA_PLATFORM=offscreen).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Open the operator console: fleet table, device detail, attention list, audit trail."""
    try:
        from console.app import run_console
    except ImportError as exc:  # PySide6 is an optional dependency
        fail(f"the console needs PySide6: pip install 'fleetgate[console]' ({exc})")
    code = run_console(
        profile,
        passphrase_file=passphrase_file,
        screenshot=screenshot,
        report=lambda message: err_console.print(message, highlight=False),
    )
    if code:
        raise typer.Exit(code)
