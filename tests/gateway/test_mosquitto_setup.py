"""Finding Mosquitto, running its process, and the checks MosquittoBroker makes before it
starts anything."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
from pathlib import Path

import pytest

from gateway.broker_control import BrokerControl
from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
    MosquittoProcess,
    MosquittoReason,
    ServerTlsMaterial,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
)
from gateway.mosquitto.files import rotate_if_large, write_atomic
from gateway.store import IdentityState

HAVE_MOSQUITTO = shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()
needs_mosquitto = pytest.mark.skipif(
    not HAVE_MOSQUITTO, reason="Mosquitto is not installed (apt-get install mosquitto)"
)
MATERIAL = ServerTlsMaterial(
    b"-----BEGIN CERTIFICATE-----", b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN CERTIFICATE-----"
)
CRL = b"-----BEGIN X509 CRL-----"


def test_missing_binary_and_plugin_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(MosquittoError) as caught:
        find_mosquitto(tmp_path / "mosquitto")
    assert caught.value.reason is MosquittoReason.MOSQUITTO_MISSING
    with pytest.raises(MosquittoError) as caught:
        find_dynsec_plugin(tmp_path / "mosquitto_dynamic_security.so")
    assert caught.value.reason is MosquittoReason.PLUGIN_MISSING


@needs_mosquitto
def test_the_installed_broker_and_plugin_are_found() -> None:
    assert find_mosquitto().name == "mosquitto"
    assert find_dynsec_plugin().name == "mosquitto_dynamic_security.so"


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@needs_mosquitto
async def test_a_broker_that_cannot_start_says_why(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("listener 1883\nno_such_option true\n")
    process = MosquittoProcess(
        config, listeners=[("127.0.0.1", free_port())], output_path=tmp_path / "out"
    )
    with pytest.raises(MosquittoError) as caught:
        await process.start()
    assert caught.value.reason is MosquittoReason.START_FAILED
    assert "no_such_option" in caught.value.detail
    await process.stop()
    assert not process.running


@needs_mosquitto
async def test_a_port_held_by_another_process_is_not_taken_for_ours(tmp_path: Path) -> None:
    # connecting to the port succeeds (the holder accepts), yet our broker never bound it
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config, log = tmp_path / "held.conf", tmp_path / "held.log"
        config.write_text(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {log}\n"
            f"listener {port} 127.0.0.1\n"
        )
        process = MosquittoProcess(
            config, listeners=[("127.0.0.1", port)], log_path=log, output_path=tmp_path / "out"
        )
        with pytest.raises(MosquittoError) as caught:
            await process.start()
        await process.stop()
    assert caught.value.reason is MosquittoReason.START_FAILED
    assert "in use" in caught.value.detail


def test_a_process_that_is_not_running_cannot_reload(tmp_path: Path) -> None:
    process = MosquittoProcess(tmp_path / "x.conf", listeners=[("127.0.0.1", 1)])
    with pytest.raises(MosquittoError) as caught:
        process.reload()
    assert caught.value.reason is MosquittoReason.NOT_RUNNING
    with pytest.raises(ValueError):
        MosquittoProcess(tmp_path / "x.conf", listeners=[])


@pytest.mark.parametrize(
    ("arguments", "options", "error"),
    [
        ((Listeners(), None, CRL), {}, ValueError),  # managed needs TLS
        ((Listeners(), MATERIAL, None), {}, ValueError),  # and a CRL
        ((Listeners(), MATERIAL, "crl"), {}, TypeError),
        # an external broker needs the admin password and real ports
        ((Listeners("127.0.0.1", 1, 2, 3), None, None), {"external": True}, ValueError),
        ((Listeners(), None, None), {"external": True, "admin_password": "x"}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"admin_username": "fleetgate-admin"}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"internal_username": "fleetgate-gateway"}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"internal_username": "_fg_admin"}, ValueError),
        # the enrollment instance's own accounts
        ((Listeners(), MATERIAL, CRL), {"internal_username": "_fg_bridge"}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"admin_username": "_fg_monitor"}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"batch_size": 2}, ValueError),
        ((Listeners(), MATERIAL, CRL), {"command_timeout": 0}, ValueError),
        ((object(), MATERIAL, CRL), {}, TypeError),
    ],
)
def test_bad_configuration_is_refused_at_construction(
    tmp_path: Path,
    arguments: tuple[object, ...],
    options: dict[str, object],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        MosquittoBroker(tmp_path, *arguments, **options)  # type: ignore[arg-type]


def test_listener_and_tls_values_are_checked() -> None:
    with pytest.raises(ValueError):
        Listeners(enrollment_port=70000)
    with pytest.raises(TypeError):
        Listeners(internal_port="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Listeners(host="")
    with pytest.raises(ValueError):
        ServerTlsMaterial(b"cert", b"key", b"ca")
    with pytest.raises(TypeError):
        ServerTlsMaterial("cert", b"key", b"ca")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MosquittoBroker("run", Listeners(), MATERIAL, CRL)  # type: ignore[arg-type]


async def test_nothing_works_before_start(tmp_path: Path) -> None:
    broker: BrokerControl = MosquittoBroker(tmp_path, Listeners(), MATERIAL, CRL)
    with pytest.raises(MosquittoError) as caught:
        _ = broker.ports
    assert caught.value.reason is MosquittoReason.NOT_RUNNING
    with pytest.raises(MosquittoError) as caught:
        await broker.apply("dev-a", IdentityState.ACTIVE)
    assert caught.value.reason is MosquittoReason.NOT_RUNNING
    assert broker.connected() == {}


def test_logs_are_rotated_once_large(tmp_path: Path) -> None:
    log = tmp_path / "mosquitto.log"
    assert rotate_if_large(log, 10) is False  # nothing there yet
    log.write_bytes(b"x" * 10)
    assert rotate_if_large(log, 10) is False
    log.write_bytes(b"y" * 11)
    assert rotate_if_large(log, 10) is True
    assert not log.exists() and (tmp_path / "mosquitto.log.1").read_bytes() == b"y" * 11


def test_atomic_writes_replace_whole_files_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "crl.pem"
    write_atomic(target, b"old")
    write_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["crl.pem"]  # no temporary left behind
