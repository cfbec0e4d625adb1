"""`fleetgate run` and `fleetgate demo`: the gateway in the foreground."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import typer
from rich.logging import RichHandler

from gateway.cli.common import (
    HomeOption,
    JsonOption,
    console,
    fail,
    print_json,
    resolve_home,
    settings_for,
)
from gateway.config import ConfigError, load_settings
from gateway.home import init_home, is_initialised


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    # amqtt narrates every packet at INFO; the gateway's own lines are what an operator needs.
    for noisy in ("amqtt", "transitions", "aiomqtt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_command(
    home: HomeOption = None,
    broker: Annotated[
        str | None,
        typer.Option(help="embedded (amqtt, in this process) or mosquitto (default: settings)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    from gateway.service import Gateway

    settings = settings_for(home)
    if broker not in (None, "embedded", "mosquitto"):
        fail(f"--broker must be embedded or mosquitto, not {broker!r}")
    _logging(verbose)

    async def serve() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        gateway = Gateway(settings, broker_kind=broker)
        await gateway.start()
        ports = gateway.ports
        console.print(
            f"[bold green]Fleetgate running[/] on {gateway.broker_kind} "
            f"(home {settings.home}, trust domain "
            f"{settings.trust_domain})\n"
            f"  enrollment  mqtts://{settings.broker.host}:{ports.enrollment}\n"
            f"  operational mqtts://{settings.broker.host}:{ports.operational}"
        )
        try:
            await stop.wait()
        finally:
            console.print("stopping…")
            await gateway.stop()

    asyncio.run(serve())


def demo_command(
    home: HomeOption = None,
    devices: Annotated[int, typer.Option(help="Simulated sensors.")] = 25,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")
    ] = None,
    cert_lifetime: Annotated[
        int | None, typer.Option(help="Ask for certificates this short (seconds, >= 60).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Initialise if needed, run the gateway and a simulated fleet against it."""
    from gateway.service import Gateway
    from simulators.factory import trust_factory
    from simulators.fleet import FleetOptions, run_fleet

    folder = resolve_home(home)
    if not is_initialised(folder):
        init_home(folder)
        if not as_json:
            console.print(f"initialised a new gateway home in {folder}")
    try:
        settings = load_settings(folder)
    except ConfigError as exc:
        fail(str(exc))
    factory = trust_factory(settings)
    if not as_json:
        _logging(False)
        logging.getLogger().setLevel(logging.WARNING)

    async def demo() -> dict[str, object]:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        gateway = Gateway(settings)
        await gateway.start()
        ports = gateway.ports
        if not as_json:
            console.print(
                f"[bold]Fleetgate demo[/]: gateway home {settings.home} "
                f"(trust domain {settings.trust_domain})\n"
                f"  enrollment  mqtts://127.0.0.1:{ports.enrollment}   "
                "(server TLS, devices enroll here)\n"
                f"  operational mqtts://127.0.0.1:{ports.operational}   "
                "(mutual TLS with issued certificates)"
            )
        try:
            summary = await run_fleet(
                FleetOptions(
                    devices=devices,
                    duration=duration,
                    host="127.0.0.1",
                    enrollment_port=ports.enrollment,
                    operational_port=ports.operational,
                    ca_pem=gateway.ca_chain_pem(),
                    cert_lifetime=cert_lifetime,
                    progress=not as_json,
                ),
                factory,
                stop,
            )
        finally:
            await gateway.stop()
        return summary.as_dict()

    result = asyncio.run(demo())
    if as_json:
        print_json(result)
    else:
        console.print(result)
