"""The simulators' building blocks: options, the swarm's spec, the bare MQTT probe, the
firmware allow-list a tamper simulation needs, and `fleetgate sim`'s refusals."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_settings
from gateway.home import init_home
from simulators.device import SensorOptions
from simulators.factory import FIRMWARE_DIGEST, MODEL, allow_simulated_firmware
from simulators.probe import Admission, admission, connect_packet, subscribe_packet
from simulators.swarm import SwarmSpec, split

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def sensor(**changes: object) -> SensorOptions:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "enrollment_port": 8883,
        "operational_port": 8884,
        "ca_pem": CA,
    }
    return SensorOptions(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"ca_pem": b"not pem"},
        {"enrollment_port": 0},
        {"operational_port": 70000},
        {"enrollment_port": True},
        {"telemetry_interval": -1.0},
        {"response_timeout": 0.0},
        {"min_backoff": 0.0},
        {"min_backoff": 20.0, "max_backoff": 10.0},
        {"keepalive": 0},
    ],
)
def test_bad_sensor_options_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        sensor(**changes)


def test_sensor_options_accept_an_idle_sensor_without_telemetry() -> None:
    assert sensor(telemetry_interval=0.0).telemetry_interval == 0.0


def spec(**changes: object) -> SwarmSpec:
    base: dict[str, object] = {
        "device_ids": ("a-1", "a-2"),
        "host": "127.0.0.1",
        "enrollment_port": 1,
        "operational_port": 2,
        "ca_pem": CA.decode(),
        "factory_dir": "/tmp/factory",
    }
    return SwarmSpec(**{**base, **changes})  # type: ignore[arg-type]


def test_a_swarm_spec_survives_its_trip_to_the_worker_process() -> None:
    original = spec(cert_lifetime=60, reconnect_after_renewal=True, probe_reconnects=True)
    assert SwarmSpec.from_json(original.to_json()) == original
    options = original.sensor_options(3)
    assert options.cert_lifetime == 60 and options.reconnect_after_renewal
    assert options.seed == original.seed + 3


@pytest.mark.parametrize(
    "changes",
    [
        {"device_ids": ()},
        {"device_ids": ("a-1", "a-1")},
        {"concurrency": 0},
        {"ca_pem": "no certificate here"},
    ],
)
def test_bad_swarm_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        spec(**changes)


def test_split_deals_devices_round_robin_without_empty_shares() -> None:
    assert split(["a", "b", "c", "d", "e"], 2) == [("a", "c", "e"), ("b", "d")]
    assert split(["a"], 4) == [("a",)]
    with pytest.raises(ValueError):
        split(["a"], 0)


def test_probe_packets_are_mqtt_3_1_1() -> None:
    # CONNECT: "MQTT", level 4, clean session, keep-alive 30, client id "d"
    assert connect_packet("d") == bytes.fromhex("100d00044d5154540402001e000164")
    # SUBSCRIBE, packet id 1, filter "t", QoS 1
    assert subscribe_packet("t") == bytes.fromhex("8206000100017401")
    long_id = "x" * 200
    packet = connect_packet(long_id)
    assert packet[1] & 0x80  # remaining length takes two bytes past 127
    assert len(packet) == 1 + 2 + 10 + 2 + 200


async def test_the_probe_reports_a_closed_port_as_refused() -> None:
    import ssl

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    context = ssl.create_default_context()
    async with server:
        verdict = await admission("127.0.0.1", port, context, "dev", "t", timeout=5.0)
    assert verdict is Admission.TLS_REFUSED
    assert verdict.refused
    assert not Admission.TIMEOUT.refused and not Admission.ADMITTED.refused


def test_the_simulated_firmware_is_allow_listed_once(tmp_path: Path) -> None:
    init_home(tmp_path)
    assert allow_simulated_firmware(tmp_path) is True
    assert allow_simulated_firmware(tmp_path) is False
    settings = load_settings(tmp_path)
    assert settings.policy.firmware[MODEL] == (FIRMWARE_DIGEST,)


def test_an_operator_allow_list_for_the_model_is_left_alone(tmp_path: Path) -> None:
    init_home(tmp_path)
    path = tmp_path / "fleetgate.toml"
    theirs = "ab" * 32
    path.write_text(path.read_text().replace(
        "[policy.firmware]\n", f'[policy.firmware]\n"{MODEL}" = ["{theirs}"]\n'
    ))
    assert allow_simulated_firmware(tmp_path) is False
    assert tomllib.loads(path.read_text())["policy"]["firmware"][MODEL] == [theirs]


def test_a_home_without_a_firmware_table_gets_one(tmp_path: Path) -> None:
    init_home(tmp_path)
    path = tmp_path / "fleetgate.toml"
    path.write_text(path.read_text().replace("[policy.firmware]\n", ""))
    assert allow_simulated_firmware(tmp_path) is True
    assert load_settings(tmp_path).policy.firmware[MODEL] == (FIRMWARE_DIGEST,)


def test_sim_tamper_refuses_to_run_before_the_gateway_has_an_allow_list(tmp_path: Path) -> None:
    init_home(tmp_path)
    result = CliRunner().invoke(
        app, ["sim", "--mode", "tamper", "--home", str(tmp_path), "--json"]
    )
    assert result.exit_code == 1
    assert "restart the gateway" in result.output
    # The list is in place now: the next run (after a restart) can bite.
    assert load_settings(tmp_path).policy.firmware[MODEL] == (FIRMWARE_DIGEST,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "chaos"], "--mode must be one of"),
        (["--devices", "0"], "--devices must be at least 1"),
        (["--cert-lifetime", "30"], "at least 60 seconds"),
    ],
)
def test_sim_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    init_home(tmp_path)
    result = CliRunner().invoke(app, ["sim", "--home", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_sim_refuses_a_bad_gateway_address(tmp_path: Path) -> None:
    init_home(tmp_path)
    result = CliRunner().invoke(app, ["sim", "--home", str(tmp_path), "--gateway", "nohost"])
    assert result.exit_code == 2
    assert json.dumps("nohost")[1:-1] in result.output
