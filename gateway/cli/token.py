"""`fleetgate token create`: one-time bootstrap tokens for devices without a birth certificate."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

import typer

from gateway.cli.common import HomeOption, JsonOption, console, fail, print_json, settings_for
from gateway.operations import OperationError, cli_actor, create_token, open_store

app = typer.Typer(help="Bootstrap tokens.", no_args_is_help=True)

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '10m', '2h', '1d' or plain seconds."""
    if text.isdigit():
        return timedelta(seconds=int(text))
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 10m, 2h or 1d")
    return timedelta(seconds=int(match[1]) * _UNIT[match[2]])


@app.command("create")
def create_command(
    device_id: Annotated[str, typer.Option("--device-id", help="The device this token enrolls.")],
    ttl: Annotated[str, typer.Option(help="How long the token stays usable.")] = "10m",
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a token that enrolls DEVICE_ID once, within TTL."""
    lifetime = parse_duration(ttl)
    store = open_store(settings_for(home))
    try:
        token = create_token(store, device_id, ttl=lifetime, actor=cli_actor())
    except OperationError as exc:
        fail(str(exc))
    if as_json:
        seconds = int(lifetime.total_seconds())
        print_json({"device_id": device_id, "token": token, "ttl_seconds": seconds})
    else:
        console.print(token, highlight=False, soft_wrap=True)
