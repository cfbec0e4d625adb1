"""`fleetgate run` and `fleetgate demo`: the gateway in the foreground."""

from __future__ import annotations

import asyncio
import logging
import os
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
from gateway.collector import CollectorPolicy
from gateway.config import DATABASE_ENV, ConfigError, load_settings, passphrase_from_environment
from gateway.home import HomeExistsError, init_home, is_initialised
from pki.errors import KeyStoreError


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    # amqtt narrates every packet at INFO; the gateway's own lines are what an operator needs.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiomqtt warns at every publish while more than 10 await their PUBACK, which a burst of
    # enrollments does by design (rendering those lines cost more CPU than the replies); lost
    # connections are reported by the transport itself.
    logging.getLogger("aiomqtt").setLevel(logging.ERROR)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database",
        help="Registry URL, sqlite:///PATH or postgresql://USER@HOST/DB "
        "(default: $FLEETGATE_DATABASE_URL, then database_url in fleetgate.toml).",
        show_default=False,
    ),
]


def _use_database(url: str | None) -> None:
    """``--database`` outranks the environment and the settings file: it becomes this
    process's $FLEETGATE_DATABASE_URL, which ``Settings.database`` reads first."""
    if url is not None:
        if not url.strip():
            fail("--database must not be empty")
        os.environ[DATABASE_ENV] = url


def run_command(
    home: HomeOption = None,
    broker: Annotated[
        str | None,
        typer.Option(help="embedded (amqtt, in this process) or mosquitto (default: settings)."),
    ] = None,
    database: DatabaseOption = None,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Be one of several gateways sharing this home's CA, a PostgreSQL registry and "
            "the Mosquitto that `fleetgate broker` runs (see docs/scale-out.md).",
        ),
    ] = False,
    node: Annotated[
        str | None,
        typer.Option(help="This gateway's name in the cluster (default: HOST-PID)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    from gateway.cluster import ClusterError, ClusterMember
    from gateway.service import Gateway

    _use_database(database)
    settings = settings_for(home)
    if broker not in (None, "embedded", "mosquitto"):
        fail(f"--broker must be embedded or mosquitto, not {broker!r}")
    if cluster and broker == "embedded":
        fail("--cluster needs --broker mosquitto: the embedded broker cannot share requests")
    if node is not None and not cluster:
        fail("--node names a gateway of a cluster: add --cluster")
    member = None
    if cluster:
        broker = "mosquitto"
        try:
            member = ClusterMember(settings, node=node)
        except (ClusterError, ValueError) as exc:
            fail(str(exc))
    _logging(verbose)

    async def serve() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        try:
            gateway = Gateway(settings, broker_kind=broker, cluster=member)
        except (KeyStoreError, ConfigError) as exc:
            fail(f"cannot open the gateway's keys: {exc}")
        await gateway.start()
        # full garbage collections that stay short as the fleet grows (gateway.collector)
        collector = CollectorPolicy()
        collector.install(asyncio.get_running_loop())
        ports = gateway.ports
        role = f", cluster member {member.node}" if member is not None else ""
        console.print(
            f"[bold green]Fleetgate running[/] on {gateway.broker_kind} "
            f"(home {settings.home}, trust domain "
            f"{settings.trust_domain}{role})\n"
            f"  enrollment  mqtts://{settings.broker.host}:{ports.enrollment}\n"
            f"  operational mqtts://{settings.broker.host}:{ports.operational}"
        )
        try:
            await stop.wait()
        finally:
            console.print("stopping…")
            collector.uninstall()
            await gateway.stop()

    asyncio.run(serve())


def broker_command(
    home: HomeOption = None,
    database: DatabaseOption = None,
    internal_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the gateways' internal listener on 127.0.0.1 (default: the last "
            "run's, else a free one)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the Mosquitto that several gateways (`fleetgate run --cluster`) share, until SIGINT
    or SIGTERM. Listens on the home's broker ports; writes cluster/broker.json for them."""
    from gateway.cluster.keeper import BrokerKeeper

    _use_database(database)
    settings = settings_for(home)
    if internal_port is not None and not 0 <= internal_port < 65536:
        fail(f"--internal-port must be a TCP port, not {internal_port}")
    _logging(verbose)

    async def serve() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        keeper = BrokerKeeper(settings, internal_port=internal_port)
        shared = await keeper.start()
        console.print(
            f"[bold green]Fleetgate broker running[/] for the gateways of {settings.home}\n"
            f"  enrollment  mqtts://{shared.host}:{shared.enrollment_port}\n"
            f"  operational mqtts://{shared.host}:{shared.operational_port}\n"
            f"  internal    mqtt://{shared.internal_host}:{shared.internal_port}"
        )
        try:
            await stop.wait()
        finally:
            console.print("stopping…")
            await keeper.stop()

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
        try:
            init_home(folder, passphrase=passphrase_from_environment())
        except HomeExistsError as exc:
            fail(str(exc))
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
