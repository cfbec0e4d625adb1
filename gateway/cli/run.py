"""`fleetgate run` and `fleetgate demo`: the gateway in the foreground."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, TypeVar

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
from gateway.cli.init import init_errors_reported
from gateway.collector import CollectorPolicy
from gateway.config import (
    CONFIG_NAME,
    DATABASE_ENV,
    MIN_CERT_LIFETIME,
    ConfigError,
    Settings,
    check_database_url,
    load_settings,
    passphrase_from_environment,
)
from gateway.home import init_home, is_initialised
from pki.errors import KeyStoreError

if TYPE_CHECKING:
    from gateway.cluster import ClusterMember
    from gateway.cluster.keeper import BrokerKeeper
    from gateway.service import Gateway

log = logging.getLogger(__name__)
T = TypeVar("T")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
    )
    # amqtt narrates every packet at INFO; the gateway's own lines are what an operator needs.
    # alembic narrates its plugins and the schema check at every start.
    for noisy in ("amqtt", "transitions", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiomqtt warns at every publish while more than 10 await their PUBACK, which a burst of
    # enrollments does by design (rendering those lines cost more CPU than the replies); lost
    # connections are reported by the transport itself. aiomqtt logs as "mqtt" unless given a
    # logger (the demo's sensors warned at every burst of renewals).
    for chatty in ("aiomqtt", "mqtt"):
        logging.getLogger(chatty).setLevel(logging.ERROR)


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


def _open_gateway(
    settings: Settings, *, broker_kind: str | None = None, cluster: ClusterMember | None = None
) -> Gateway:
    """The gateway built from its home, or a one-line error (see ``_opened``)."""
    # imported here: `fleetgate --help` and the other commands need none of the service
    from gateway.service import Gateway

    return _opened(settings, lambda: Gateway(settings, broker_kind=broker_kind, cluster=cluster))


def _open_keeper(settings: Settings, internal_port: int | None) -> BrokerKeeper:
    """The shared broker's keeper (a gateway that is never started, opened as `run` opens
    one), or a one-line error."""
    from gateway.cluster.keeper import BrokerKeeper

    return _opened(settings, lambda: BrokerKeeper(settings, internal_port=internal_port))


def _opened(settings: Settings, build: Callable[[], T]) -> T:
    """``build()``, which opens the home's keys and registry, or a one-line error: a bad key,
    passphrase, PIN, registry or setting never reaches the operator as a traceback."""
    from gateway.cluster import ClusterError
    from gateway.store import StoreError

    try:
        check_database_url(settings.database, f"the registry URL (--database, ${DATABASE_ENV})")
    except ConfigError as exc:
        fail(str(exc))
    try:
        return build()
    except (KeyStoreError, ConfigError) as exc:
        fail(f"cannot open the gateway's keys: {exc}")
    except StoreError as exc:
        fail(f"cannot open the registry: {exc}")
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        fail(f"cannot read the gateway home{name}: {exc.strerror or exc}")
    except (ClusterError, ValueError) as exc:
        fail(f"cannot start the gateway: {exc}")


def _busy_ports(host: str, ports: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """The ``(port, what sets it)`` pairs of ``ports`` another process listens on now. Asked
    after a failed start, when ours are closed again: a bind that fails with EADDRINUSE is
    someone else's (SO_REUSEADDR, as the brokers bind, so a port in TIME_WAIT does not count)."""
    busy = []
    for port, source in ports:
        if port == 0:
            continue  # the system picks a free one
        try:
            addresses = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError:
            continue
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        busy.append((port, source))
                        break
    return busy


# what a bind says about the address or port itself (not here, privileged, taken)
_CANNOT_LISTEN = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


async def _start_or_fail(
    start: Callable[[], Awaitable[T]],
    stop: Callable[[], Awaitable[object]] | None,
    host: str,
    ports: Mapping[str, tuple[int, str]],
) -> T:
    """Await ``start()``; when it fails, ``stop()`` what it began and say why in one line: a
    port another process holds is named with what sets it. ``ports``: listener -> (port, the
    setting or option naming it)."""
    from gateway.cluster import ClusterError
    from gateway.mosquitto.errors import MosquittoError
    from gateway.store import StoreError

    try:
        return await start()
    except (OSError, MosquittoError, ClusterError, StoreError) as exc:
        if stop is not None:
            try:
                await stop()
            except Exception:  # what failed to start may not stop cleanly: the cause is exc
                log.debug("stopping after a failed start", exc_info=True)
        busy = _busy_ports(host, ports.values())
        if busy:
            fail(
                "; ".join(
                    f"port {port} on {host} is already in use (set by {source})"
                    for port, source in busy
                )
                + ": stop what listens there, or choose another port (0 lets the system pick)"
            )
        if isinstance(exc, MosquittoError):
            fail(f"cannot start Mosquitto: {exc}")
        if isinstance(exc, OSError) and exc.errno in _CANNOT_LISTEN and ports:
            listed = ", ".join(f"{port} ({source})" for port, source in ports.values())
            fail(f"cannot listen on {host} ports {listed}: {exc.strerror or exc}")
        # str(): an exception is always true, and asyncio's timeout is a bare TimeoutError()
        fail(f"cannot start the gateway: {str(exc) or type(exc).__name__}")


def _port_sources(settings: Settings, **options: int | None) -> dict[str, tuple[int, str]]:
    """Each broker port and what set it: a command-line option when given, else its key in
    fleetgate.toml."""
    config = settings.home / CONFIG_NAME
    return {
        name: (
            getattr(settings.broker, f"{name}_port"),
            f"--{name}-port"
            if options.get(name) is not None
            else f"broker.{name}_port in {config}",
        )
        for name in ("enrollment", "operational")
    }


def _given(option: int | None, setting: int) -> int:
    return setting if option is None else option


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
        gateway = _open_gateway(settings, broker_kind=broker, cluster=member)
        # a cluster's gateways use the ports of the broker `fleetgate broker` runs
        sources = {} if member is not None else _port_sources(settings)
        await _start_or_fail(gateway.start, gateway.stop, settings.broker.host, sources)
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
    _use_database(database)
    settings = settings_for(home)
    if internal_port is not None and not 0 <= internal_port < 65536:
        fail(f"--internal-port must be a TCP port, not {internal_port}")
    _logging(verbose)

    async def serve() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        keeper = _open_keeper(settings, internal_port)
        # keeper.start stops what it began when it fails
        sources = _port_sources(settings)
        shared = await _start_or_fail(keeper.start, None, settings.broker.host, sources)
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
    enrollment_port: Annotated[
        int | None,
        typer.Option(
            help="Enrollment listener port (0: any free port; default: broker.enrollment_port "
            "in fleetgate.toml).",
            show_default=False,
        ),
    ] = None,
    operational_port: Annotated[
        int | None,
        typer.Option(
            help="Operational listener port (0: any free port; default: "
            "broker.operational_port in fleetgate.toml).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Initialise if needed, run the gateway and a simulated fleet against it."""
    from simulators.factory import trust_factory
    from simulators.fleet import FleetOptions, run_fleet

    for option, port in (
        ("--enrollment-port", enrollment_port),
        ("--operational-port", operational_port),
    ):
        if port is not None and not 0 <= port <= 65535:
            fail(f"{option} must be a TCP port (0-65535), not {port}")
    if enrollment_port == operational_port and enrollment_port:
        fail("--enrollment-port and --operational-port must differ")
    if devices < 1:
        fail("--devices must be at least 1")
    if cert_lifetime is not None and cert_lifetime < MIN_CERT_LIFETIME:
        fail(f"--cert-lifetime must be at least {MIN_CERT_LIFETIME} seconds")
    if duration is not None and duration <= 0:
        fail("--duration must be more than 0 seconds")
    folder = resolve_home(home)
    if not is_initialised(folder):
        with init_errors_reported(folder):
            init_home(folder, passphrase=passphrase_from_environment())
        if not as_json:
            console.print(f"initialised a new gateway home in {folder}")
    try:
        settings = load_settings(folder)
        settings = replace(
            settings,
            broker=replace(
                settings.broker,
                enrollment_port=_given(enrollment_port, settings.broker.enrollment_port),
                operational_port=_given(operational_port, settings.broker.operational_port),
            ),
        )
    except ConfigError as exc:
        fail(str(exc))
    factory = trust_factory(settings)
    if not as_json:
        _logging(False)
        logging.getLogger().setLevel(logging.WARNING)

    async def demo() -> dict[str, object]:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        gateway = _open_gateway(settings)
        sources = _port_sources(settings, enrollment=enrollment_port, operational=operational_port)
        await _start_or_fail(gateway.start, gateway.stop, settings.broker.host, sources)
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
        # the ports the fleet used: with 0 the system picked them
        return {
            **summary.as_dict(),
            "enrollment_port": ports.enrollment,
            "operational_port": ports.operational,
        }

    result = asyncio.run(demo())
    if as_json:
        print_json(result)
    else:
        console.print(result)
