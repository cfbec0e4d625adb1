"""The `fleetgate` command. One module per command group; this one only assembles them."""

from __future__ import annotations

import typer

from gateway.cli import audit, bench, device, operator, token
from gateway.cli.common import console
from gateway.cli.console_app import console_command
from gateway.cli.init import init_command
from gateway.cli.metrics import metrics_command
from gateway.cli.run import broker_command, demo_command, run_command
from gateway.cli.sim import sim_command

app = typer.Typer(
    name="fleetgate",
    help="Edge identity gateway for IoT fleets.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("init")(init_command)
app.command("run")(run_command)
app.command("broker")(broker_command)
app.command("demo")(demo_command)
app.command("sim")(sim_command)
app.command("console")(console_command)
app.command("metrics")(metrics_command)
app.add_typer(device.app, name="device")
app.add_typer(token.app, name="token")
app.add_typer(audit.app, name="audit")
app.add_typer(operator.app, name="operator")
app.add_typer(bench.app, name="bench")

__all__ = ["app", "console", "main"]


def main() -> None:
    app()
