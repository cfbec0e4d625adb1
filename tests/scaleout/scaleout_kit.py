"""What the scale-out tests share: a throwaway PostgreSQL, a cluster home, a device driven over
MQTT, connections that notice being cut."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import tomli_w

from gateway.cluster import ClusterMember
from gateway.cluster.keeper import BrokerKeeper
from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.home import init_home
from gateway.mosquitto import MosquittoError, find_dynsec_plugin, find_mosquitto
from gateway.protocol.device import DeviceClient, Enrolled, Rejected, Send
from gateway.protocol.messages import Firmware
from gateway.protocol.topics import Channel
from gateway.service import Gateway
from pki.clock import SystemClock
from pki.factory import FactoryCA
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION, trust_factory
from simulators.tls import mutual_context, server_auth_context

POSTGRES_ENV = "FLEETGATE_TEST_POSTGRES_URL"
FIRMWARE = Firmware(version=FIRMWARE_VERSION, digest=FIRMWARE_DIGEST)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_missing() -> str | None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except MosquittoError as exc:
        return (
            f"Mosquitto with dynamic security is not installed ({exc}); "
            "apt-get install mosquitto"
        )
    return None


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary folder on a free loopback port, started when no
    server was given in $FLEETGATE_TEST_POSTGRES_URL (CI starts one in .ci/run).

    The server runs under a small shell watchdog that stops it once this process is gone, so a
    test run killed outright does not leave its server running (``--pdeathsig`` of setpriv did
    not fire here)."""

    url: str

    @classmethod
    @contextlib.contextmanager
    def provide(cls) -> Iterator[ThrowawayPostgres | str]:
        """Yields the server, or a reason to skip."""
        if url := os.environ.get(POSTGRES_ENV):
            yield cls(url)
            return
        bin_dir = _postgres_bin()
        setpriv = shutil.which("setpriv")
        if bin_dir is None or setpriv is None:
            yield (
                f"no PostgreSQL server: set ${POSTGRES_ENV} or install the server binaries "
                "(apt-get install postgresql)"
            )
            return
        folder = Path(tempfile.mkdtemp(prefix="fleetgate-pg-"))
        as_user = [setpriv]
        if os.geteuid() == 0:  # initdb and postgres refuse root: the package's postgres user
            shutil.chown(folder, "postgres", "postgres")
            as_user += ["--reuid", "postgres", "--regid", "postgres", "--init-groups"]
        as_user.append("--")
        port = free_port()
        data = folder / "data"
        server: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run(
                [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "fleetgate", "-A",
                 "trust", "-E", "UTF8", "--no-sync"],
                check=True, capture_output=True, timeout=120,
            )
            postgres = [
                str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300",
            ]
            with open(folder / "server.log", "wb") as log:
                server = subprocess.Popen(
                    [*as_user, "sh", "-c", _WATCHDOG, "watchdog", str(os.getpid()), *postgres],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            _wait_accepting(port, server)
        except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
            _stop(server)
            shutil.rmtree(folder, ignore_errors=True)
            yield f"could not start a throwaway PostgreSQL ({exc})"
            return
        try:
            yield cls(f"postgresql://fleetgate@127.0.0.1:{port}/postgres")
        finally:
            _stop(server)
            shutil.rmtree(folder, ignore_errors=True)

    def fresh_database(self) -> tuple[str, str]:
        """(URL of a new, empty database, its name)."""
        import psycopg

        name = f"fg_{secrets.token_hex(6)}"
        with psycopg.connect(self._psycopg_url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}", name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self._psycopg_url(), autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _psycopg_url(self) -> str:
        return self.url.replace("postgresql+psycopg://", "postgresql://")


# $1: the pid to outlive; then the server's command. SIGINT (our _stop) or the pid vanishing
# both end in a fast shutdown of the server.
_WATCHDOG = """
parent=$1; shift
"$@" & server=$!
trap 'kill -INT $server; wait $server; exit 0' INT TERM
while [ -d /proc/$parent ] && kill -0 $server 2>/dev/null; do sleep 1 & wait $!; done
kill -INT $server 2>/dev/null; wait $server
"""


def _wait_accepting(port: int, server: subprocess.Popen[bytes], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if server.poll() is not None:
            raise subprocess.SubprocessError(f"postgres exited with {server.returncode}")
        try:
            import psycopg

            with psycopg.connect(
                f"postgresql://fleetgate@127.0.0.1:{port}/postgres", connect_timeout=2
            ):
                return
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise TimeoutError(f"postgres did not accept connections within {seconds} s")


def _stop(server: subprocess.Popen[bytes] | None) -> None:
    if server is None or server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)  # fast shutdown
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def cluster_home(folder: Path, database_url: str) -> Settings:
    """A gateway home for a cluster: Mosquitto on free ports, the registry in PostgreSQL, the
    simulated manufacturer trusted."""
    init_home(folder)
    path = folder / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["database_url"] = database_url
    data["broker"].update(
        kind="mosquitto", enrollment_port=free_port(), operational_port=free_port()
    )
    path.write_text(tomli_w.dumps(data))
    settings = load_settings(folder)
    trust_factory(settings)
    return settings


def device(factory: FactoryCA, serial: str) -> DeviceClient:
    return DeviceClient(
        factory.mint(serial, "TH-200"),
        firmware=FIRMWARE,
        clock=SystemClock(),
        response_timeout=2.0,
    )


async def enroll(
    client: DeviceClient, host: str, port: int, ca_pem: bytes, timeout: float = 30.0
) -> Enrolled:
    """Run the device state machine over one enrollment connection until it holds a
    certificate; AssertionError on a final rejection or after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    async with aiomqtt.Client(
        host, port, identifier=client.device_id, tls_context=server_auth_context(ca_pem),
        timeout=5,
    ) as mqtt:
        for topic in client.subscriptions(Channel.ENROLL):
            await mqtt.subscribe(topic, qos=1)
        messages = mqtt.messages.__aiter__()
        events = client.start()
        while True:
            for event in events:
                if isinstance(event, Enrolled):
                    return event
                if isinstance(event, Rejected) and event.final:
                    raise AssertionError(f"{client.device_id} rejected: {event}")
                if isinstance(event, Send):
                    await mqtt.publish(event.topic, event.payload, qos=1)
            assert loop.time() < end, f"{client.device_id} not enrolled within {timeout} s"
            try:
                message = await asyncio.wait_for(messages.__anext__(), 0.2)
            except TimeoutError:
                events = client.timeout()
                continue
            events = client.receive(str(message.topic), bytes(message.payload))


class Session:
    """An operational connection with its issued certificate; ``ended`` completes when the
    broker closes it."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for _ in self.client.messages:
                pass
        except aiomqtt.MqttError as exc:
            if not self.ended.done():
                self.ended.set_result(exc)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)


async def operational(
    enrolled: Enrolled, device_id: str, host: str, port: int, ca_pem: bytes
) -> Session:
    """Connect with the issued certificate and subscribe to the device's own commands (a
    revoked device that still got in would have no rights: the subscription is refused)."""
    client = aiomqtt.Client(
        host, port, identifier=device_id, timeout=3,
        tls_context=mutual_context(ca_pem, enrolled.key, enrolled.certificate,
                                   enrolled.chain[:-1]),
    )
    await client.__aenter__()
    session = Session(client)
    codes = await client.subscribe(f"fg/v1/dev/{device_id}/cmd", qos=1)
    if any(getattr(code, "value", code) >= 0x80 for code in codes):
        await session.close()
        raise PermissionError(f"{device_id} may not subscribe to its commands")
    return session


async def refused(enrolled: Enrolled, device_id: str, host: str, port: int, ca_pem: bytes) -> bool:
    """True when the device cannot open a working operational session any more."""
    try:
        session = await operational(enrolled, device_id, host, port, ca_pem)
    except (aiomqtt.MqttError, PermissionError, OSError):
        return True
    await session.close()
    return False


async def eventually(check, within: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``check`` (sync or async) until it returns something truthy."""
    end = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < end, f"{what} within {within} s"
        await asyncio.sleep(interval)


class Cluster:
    """Gateways of one cluster in this process beside the shared broker's keeper."""

    def __init__(self, settings: Settings, keeper: BrokerKeeper) -> None:
        self.settings = settings
        self.keeper = keeper
        self.gateways: list[Gateway] = []
        self.ca_pem = (settings.ca_dir / "root.crt").read_bytes()
        self.enforce_timeout = 5.0  # how long a follower waits for the leader's enforcement

    async def add(self, node: str) -> Gateway:
        member = ClusterMember(
            self.settings, node=node, interval=0.2, enforce_timeout=self.enforce_timeout
        )
        gateway = Gateway(self.settings, cluster=member)
        self.gateways.append(gateway)
        await gateway.start()
        return gateway

    @property
    def shared(self):  # type: ignore[no-untyped-def]
        assert self.keeper.shared is not None
        return self.keeper.shared

    async def connected_device(self, gateway: Gateway, serial: str) -> tuple[str, Session]:
        """A device enrolled through the shared broker and connected on its operational
        listener (``gateway`` only names who is expected to serve it)."""
        shared = self.shared
        client = device(trust_factory(self.settings), serial)
        enrolled = await enroll(client, shared.host, shared.enrollment_port, self.ca_pem)
        session = await operational(
            enrolled, client.device_id, shared.host, shared.operational_port, self.ca_pem
        )
        return client.device_id, session

    async def stop(self) -> None:
        for gateway in self.gateways:
            await gateway.stop()
        await self.keeper.stop()
