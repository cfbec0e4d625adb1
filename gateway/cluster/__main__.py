"""``python -m gateway.cluster``: the shared broker's keeper, as ``fleetgate broker`` runs it."""

import typer

from gateway.cli.run import broker_command

typer.run(broker_command)
