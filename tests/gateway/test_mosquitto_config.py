"""mosquitto.conf and the enrollment instance's files as rendered for the gateway's brokers (the
live tests run Mosquitto with them; these pin down each decision and every kind of bad input)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path

import pytest

from gateway.mosquitto import (
    EnrollmentConfig,
    MosquittoConfig,
    render_config,
    render_enrollment_acl,
    render_enrollment_config,
    render_monitor_acl,
    render_password_file,
)

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
        "server_cert_path": RUN / "server.pem",
        "server_key_path": RUN / "server.key",
        "client_ca_path": RUN / "client-ca.pem",
        "crl_path": RUN / "crl.pem",
        "device_acl_path": RUN / "devices.acl",
    }
    values.update(change)
    return MosquittoConfig(**values)  # type: ignore[arg-type]


def enrollment(**change: object) -> EnrollmentConfig:
    values: dict[str, object] = {
        "run_as_user": "fleetgate",
        "log_path": RUN / "enrollment.log",
        "host": "0.0.0.0",
        "enrollment_port": 8883,
        "monitor_port": 18831,
        "server_cert_path": RUN / "server.pem",
        "server_key_path": RUN / "server.key",
        "acl_path": RUN / "enrollment.acl",
        "monitor_acl_path": RUN / "monitor.acl",
        "password_path": RUN / "monitor.passwd",
        "bridge_port": 18830,
        "bridge_username": "_fg_bridge",
        "bridge_password": "s3cret-Pass_word",
        "bridge_request_clientids": ("_fg_requests-1", "_fg_requests-local-1"),
        "bridge_answer_clientids": ("_fg_answers-1", "_fg_answers-local-1"),
    }
    values.update(change)
    return EnrollmentConfig(**values)  # type: ignore[arg-type]


def sections(text: str, keyword: str = "listener ") -> tuple[list[str], dict[str, list[str]]]:
    """Global options, then each section's options keyed by its first line (a line starting
    with ``listener`` or ``connection``)."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    first = next(i for i, line in enumerate(lines) if line.startswith(keyword))
    parts: dict[str, list[str]] = {}
    current = ""
    for line in lines[first:]:
        if line.startswith(("listener ", "connection ")):
            current = line
            parts[current] = []
        else:
            parts[current].append(line)
    return lines[:first], parts


# -- the main instance -----------------------------------------------------------------------


def test_global_options_follow_the_recipe() -> None:
    global_options, _ = sections(render_config(config()))
    assert global_options == [
        "user fleetgate",
        "per_listener_settings false",
        "allow_anonymous false",  # enrollees live on the enrollment instance
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
        f"acl_file {RUN}/devices.acl",  # asked only when dynsec defers
    ]


def test_the_main_instance_has_the_internal_and_operational_listeners_only() -> None:
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
    }


def test_the_internal_listener_stays_on_loopback_whatever_the_host() -> None:
    text = render_config(config(host="192.0.2.7"))
    assert "listener 18830 127.0.0.1" in text
    assert "listener 8884 192.0.2.7" in text


def test_queue_limit_can_be_raised() -> None:
    assert "max_queued_messages 500000" in render_config(config(max_queued_messages=500_000))
    assert "max_queued_messages 500000" in render_enrollment_config(
        enrollment(max_queued_messages=500_000)
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"crl_path": Path("crl.pem")}, ValueError),  # relative
        ({"crl_path": Path("/tmp/crl.pem\ncrlfile /dev/null")}, ValueError),  # injected option
        ({"log_path": Path("/tmp/my log")}, ValueError),  # Mosquitto would cut it at the space
        ({"dynsec_path": "/tmp/dynsec.json"}, TypeError),
        ({"internal_port": 0}, ValueError),
        ({"operational_port": 65536}, ValueError),
        ({"operational_port": True}, TypeError),
        ({"operational_port": "8883"}, TypeError),
        ({"operational_port": 18830}, ValueError),  # same as internal
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
    with pytest.raises(TypeError):
        render_enrollment_config(config())  # type: ignore[arg-type]


# -- the enrollment instance -----------------------------------------------------------------


def test_the_enrollment_instance_has_per_listener_rules_and_no_dynsec() -> None:
    text = render_enrollment_config(enrollment())
    global_options, parts = sections(text)
    assert global_options[:3] == [
        "user fleetgate",
        "per_listener_settings true",
        "max_queued_messages 100000",
    ]
    assert "log_dest topic" in global_options and "connection_messages true" in global_options
    assert "plugin" not in text
    assert parts["listener 18831 127.0.0.1"] == [
        "allow_anonymous false",
        f"password_file {RUN}/monitor.passwd",
        f"acl_file {RUN}/monitor.acl",
    ]
    assert parts["listener 8883 0.0.0.0"] == [
        f"certfile {RUN}/server.pem",
        f"keyfile {RUN}/server.key",
        "allow_anonymous true",
        f"acl_file {RUN}/enrollment.acl",
    ]


def test_one_bridge_carries_requests_out_and_another_answers_in() -> None:
    _, parts = sections(render_enrollment_config(enrollment()))
    common = [
        "address 127.0.0.1:18830",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "cleansession true",
        "start_type automatic",
        "restart_timeout 1",
        "keepalive_interval 30",
        "notifications false",
        "bridge_attempt_unsubscribe false",
    ]
    login = ["remote_username _fg_bridge", "remote_password s3cret-Pass_word"]
    assert parts["connection fleetgate-requests"] == [
        *common,
        "remote_clientid _fg_requests-1",
        "local_clientid _fg_requests-local-1",
        *login,
        "topic fg/v1/enroll/+/req out 1",
    ]
    assert parts["connection fleetgate-answers"] == [
        *common,
        "remote_clientid _fg_answers-1",
        "local_clientid _fg_answers-local-1",
        *login,
        "topic fg/v1/enroll/+/resp in 1",
    ]


def test_each_enrollee_may_write_its_request_and_read_its_answer_only() -> None:
    rules = [line for line in render_enrollment_acl().splitlines() if not line.startswith("#")]
    assert [r for r in rules if r] == [
        "pattern write fg/v1/enroll/%c/req",
        "pattern read fg/v1/enroll/%c/resp",
    ]


def test_the_monitor_reads_the_log_and_nothing_else() -> None:
    rules = [line for line in render_monitor_acl("_fg_monitor").splitlines() if line]
    assert rules[1:] == ["user _fg_monitor", "topic read $SYS/broker/log/#"]
    for bad in ("monitor", "_fg monitor", "_fg_monitor\ntopic readwrite #"):
        with pytest.raises(ValueError):
            render_monitor_acl(bad)


def test_the_password_file_is_in_mosquitto_passwd_format() -> None:
    line = render_password_file("_fg_monitor", "secret", lambda n: b"S" * n)
    name, _, stored = line.rstrip("\n").partition(":")
    _, kind, iterations, salt, digest = stored.split("$")
    assert (name, kind, iterations) == ("_fg_monitor", "7", "101")
    assert base64.b64decode(salt) == b"S" * 12
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", b"S" * 12, 101)
    assert "secret" not in line


def test_the_password_file_matches_a_line_mosquitto_passwd_wrote() -> None:
    # mosquitto_passwd 2.0.11: "someone:secret", salt m2Ky9d+LFycRVsU/
    salt = base64.b64decode("m2Ky9d+LFycRVsU/")
    line = render_password_file("_fg_someone", "secret", lambda n: salt)
    assert line.endswith(
        ":$7$101$m2Ky9d+LFycRVsU/$wrSFQK7fRH2LS23uY7lItNfTgqEArvqcQ7NnXMoF0LXa9k1g7tv1zy3d2GdT"
        "t6qFMYglENN84OQo4RJzrTz7eg==\n"
    )


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        (("monitor", "pw"), ValueError),  # a certificate CN could claim it
        (("_fg_monitor", ""), ValueError),
        (("_fg_monitor", "two\nlines"), ValueError),
        (("_fg_monitor", None), ValueError),
        ((None, "pw"), TypeError),
    ],
)
def test_bad_accounts_are_refused(arguments: tuple[object, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        render_password_file(*arguments, lambda n: b"S" * n)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"acl_path": Path("enrollment.acl")}, ValueError),  # relative
        ({"password_path": "/srv/monitor.passwd"}, TypeError),
        ({"monitor_port": 8883}, ValueError),  # same as the enrollment listener
        ({"bridge_port": 18831}, ValueError),  # the bridges would talk to themselves
        ({"enrollment_port": 0}, ValueError),
        ({"bridge_password": "two words"}, ValueError),  # Mosquitto would cut it
        ({"bridge_password": "pw\nlistener 1"}, ValueError),  # injected option
        ({"bridge_password": ""}, ValueError),
        ({"bridge_username": "bridge"}, ValueError),  # a certificate CN could claim it
        ({"bridge_username": 7}, TypeError),
        ({"bridge_request_clientids": ("_fg_same", "_fg_same")}, ValueError),
        ({"bridge_answer_clientids": ("_fg_requests-1", "_fg_x")}, ValueError),  # shared
        ({"bridge_answer_clientids": "_fg_answers-1"}, TypeError),
        ({"bridge_answer_clientids": ("_fg_a", "#")}, ValueError),
        ({"host": "not a host"}, ValueError),
        ({"run_as_user": "root\nlistener 1"}, ValueError),
        ({"max_queued_messages": 0}, ValueError),
    ],
)
def test_bad_enrollment_values_are_refused(
    change: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        enrollment(**change)
