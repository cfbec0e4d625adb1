"""mosquitto.conf as rendered for the gateway's own broker (the live tests run Mosquitto with
it; these pin down each decision and every kind of bad input)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.mosquitto import MosquittoConfig, render_config

RUN = Path("/srv/fleetgate/broker")


def config(**change: object) -> MosquittoConfig:
    values: dict[str, object] = {
        "run_as_user": "fleetgate",
        "plugin_path": Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
        "dynsec_path": RUN / "dynsec.json",
        "log_path": RUN / "mosquitto.log",
        "host": "0.0.0.0",
        "internal_port": 18830,
        "operational_port": 8884,
        "enrollment_port": 8883,
        "server_cert_path": RUN / "server.pem",
        "server_key_path": RUN / "server.key",
        "client_ca_path": RUN / "client-ca.pem",
        "crl_path": RUN / "crl.pem",
    }
    values.update(change)
    return MosquittoConfig(**values)  # type: ignore[arg-type]


def sections(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """Global options, then each listener's options keyed by its "listener" line."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    first = next(i for i, line in enumerate(lines) if line.startswith("listener "))
    listeners: dict[str, list[str]] = {}
    current = ""
    for line in lines[first:]:
        if line.startswith("listener "):
            current = line
            listeners[current] = []
        else:
            listeners[current].append(line)
    return lines[:first], listeners


def test_global_options_follow_the_recipe() -> None:
    global_options, _ = sections(render_config(config()))
    assert global_options == [
        "user fleetgate",
        "per_listener_settings false",
        "allow_anonymous true",
        "max_queued_messages 100000",
        "set_tcp_nodelay true",
        "persistence false",
        f"log_dest file {RUN}/mosquitto.log",
        "log_dest topic",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        f"plugin_opt_config_file {RUN}/dynsec.json",
    ]


def test_each_listener_has_its_own_authentication() -> None:
    _, listeners = sections(render_config(config()))
    assert listeners == {
        "listener 18830 127.0.0.1": [],
        "listener 8884 0.0.0.0": [
            f"cafile {RUN}/client-ca.pem",
            f"certfile {RUN}/server.pem",
            f"keyfile {RUN}/server.key",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            f"crlfile {RUN}/crl.pem",
        ],
        "listener 8883 0.0.0.0": [f"certfile {RUN}/server.pem", f"keyfile {RUN}/server.key"],
    }


def test_the_internal_listener_stays_on_loopback_whatever_the_host() -> None:
    text = render_config(config(host="192.0.2.7"))
    assert "listener 18830 127.0.0.1" in text
    assert "listener 8884 192.0.2.7" in text


def test_queue_limit_can_be_raised() -> None:
    assert "max_queued_messages 500000" in render_config(config(max_queued_messages=500_000))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"crl_path": Path("crl.pem")}, ValueError),  # relative
        ({"crl_path": Path("/tmp/crl.pem\ncrlfile /dev/null")}, ValueError),  # injected option
        ({"log_path": Path("/tmp/my log")}, ValueError),  # Mosquitto would cut it at the space
        ({"dynsec_path": "/tmp/dynsec.json"}, TypeError),
        ({"internal_port": 0}, ValueError),
        ({"operational_port": 65536}, ValueError),
        ({"enrollment_port": True}, TypeError),
        ({"enrollment_port": "8883"}, TypeError),
        ({"enrollment_port": 8884}, ValueError),  # same as operational
        ({"host": "not a host"}, ValueError),
        ({"host": None}, TypeError),
        ({"run_as_user": "root\nlistener 1"}, ValueError),
        ({"run_as_user": 0}, TypeError),
        ({"max_queued_messages": 0}, ValueError),
        ({"max_queued_messages": 1.5}, TypeError),
    ],
)
def test_bad_values_are_refused(change: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        config(**change)


def test_only_a_config_renders() -> None:
    with pytest.raises(TypeError):
        render_config(dataclasses.asdict(config()))  # type: ignore[arg-type]
