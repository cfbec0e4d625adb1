"""What every command shares: the home option, settings loading and error output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from gateway.config import ConfigError, Settings, default_home, load_settings

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Gateway home folder (default: $FLEETGATE_HOME or ./.fleetgate).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def resolve_home(home: Path | None) -> Path:
    return home if home is not None else default_home()


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_for(home: Path | None) -> Settings:
    try:
        return load_settings(resolve_home(home))
    except ConfigError as exc:
        fail(str(exc))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, sort_keys=True) + "\n")
    sys.stdout.flush()
