"""What a gateway leaves behind when it stops, or fails to start: the running gateway's metrics
file untouched by a second one that could not start, every part stopped and the keys (a
PKCS#11 session) closed even when a part fails, and no metrics file left by a cluster node
whose name was made up for this one run."""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

import gateway.service
from gateway.cluster import ClusterMember, MemoryLocks, SharedBroker
from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.home import GatewayKeys, init_home
from gateway.metrics_export import metrics_path, read_metrics
from gateway.service import Gateway
from gateway.store_memory import MemoryStore

pytestmark = pytest.mark.broker


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def home_with_ports(home: Path, enrollment: int = 0, operational: int = 0) -> Settings:
    init_home(home)
    path = home / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["broker"]["enrollment_port"] = enrollment
    data["broker"]["operational_port"] = operational
    path.write_text(tomli_w.dumps(data))
    return load_settings(home)


@pytest.fixture
def keys_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[GatewayKeys]]:
    """Every ``GatewayKeys.close()`` call (a token session ended), in order."""
    closed: list[GatewayKeys] = []
    real_close = GatewayKeys.close

    def close(keys: GatewayKeys) -> None:
        closed.append(keys)
        real_close(keys)

    monkeypatch.setattr(GatewayKeys, "close", close)
    yield closed


async def test_a_gateway_that_cannot_start_leaves_the_running_ones_metrics_alone(
    tmp_path: Path, keys_closed: list[GatewayKeys]
) -> None:
    settings = home_with_ports(tmp_path / "home", free_port(), free_port())
    running = Gateway(settings)
    await running.start()
    try:
        second = Gateway(load_settings(settings.home))  # `fleetgate run` twice on one home
        with pytest.raises(OSError):
            await second.start()  # its ports are the running gateway's
        await second.stop()  # what `fleetgate run` does after a failed start
        assert read_metrics(metrics_path(settings.home)).up is True
        assert len(keys_closed) == 1  # the second one's keys, all the same
    finally:
        await running.stop()
    assert read_metrics(metrics_path(settings.home)).up is False


class Failure(Exception):
    pass


async def test_a_part_failing_to_stop_does_not_keep_the_others_running(
    tmp_path: Path, keys_closed: list[GatewayKeys], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = Gateway(home_with_ports(tmp_path / "home"))
    await running.start()
    assert running.transport is not None and running.broker is not None
    operational = running.ports.operational
    transport_stop = running.transport.stop

    async def failing_stop() -> None:
        await transport_stop()
        raise Failure("the transport failed to stop")

    monkeypatch.setattr(running.transport, "stop", failing_stop)
    with pytest.raises(Failure):
        await running.stop()
    # the broker behind it stopped all the same: its port takes no connection
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", operational), timeout=1).close()
    assert read_metrics(metrics_path(running.settings.home)).up is False
    assert keys_closed == [running._keys]


async def test_a_cluster_failing_to_hand_over_still_closes_the_metrics_and_keys(
    tmp_path: Path, keys_closed: list[GatewayKeys]
) -> None:
    running = Gateway(home_with_ports(tmp_path / "home"))
    await running.start()
    operational = running.ports.operational

    class Cluster:
        async def stop(self) -> None:
            raise Failure("the leader lock's database is gone")

    running.cluster = Cluster()  # type: ignore[assignment]
    with pytest.raises(Failure):
        await running.stop()
    with pytest.raises(OSError):  # the transport and the broker stopped all the same
        socket.create_connection(("127.0.0.1", operational), timeout=1).close()
    assert read_metrics(metrics_path(running.settings.home)).up is False
    assert keys_closed == [running._keys]


def test_a_gateway_that_fails_to_assemble_closes_its_keys(
    tmp_path: Path, keys_closed: list[GatewayKeys], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = home_with_ports(tmp_path / "home")

    def broken(gateway: Gateway) -> None:
        raise Failure("the admin API could not be attached")

    monkeypatch.setattr(gateway.service, "attach_admin", broken)
    with pytest.raises(Failure):
        Gateway(settings, store=MemoryStore())
    assert len(keys_closed) == 1


def shared_broker() -> SharedBroker:
    return SharedBroker(
        host="127.0.0.1",
        enrollment_port=18883,
        operational_port=18884,
        internal_port=18885,
        admin_password="secret",
    )


@pytest.mark.parametrize(("node", "left"), [(None, False), ("gw-2", True)])
def test_only_a_node_named_for_good_leaves_its_metrics_file_at_stop(
    tmp_path: Path, node: str | None, left: bool
) -> None:
    """host-pid names a new file at each start: kept, each would be read as a gateway (and
    exported as one that stopped) for ever. A node named with --node rewrites its own."""
    settings = home_with_ports(tmp_path / "home")
    member = ClusterMember(
        settings, node=node, lock=MemoryLocks().session(), shared=shared_broker()
    )
    assert member.node_given is (node is not None)
    member_gateway = Gateway(settings, store=MemoryStore(), broker_kind="mosquitto", cluster=member)
    writer = member_gateway.metrics_file
    assert writer.path == metrics_path(settings.home, member.node)
    assert writer.write() is True
    assert writer.close() is True
    assert writer.path.exists() is left
    if left:
        assert read_metrics(writer.path).up is False
