"""The enrollment instance: a second Mosquitto 2.0 that serves only the enrollment listener and
is bridged to the main instance. Pure builders of its mosquitto.conf, ACL files and password
file; ``broker`` writes them and runs the process.

Why a broker of its own: Mosquitto keeps one client-id namespace per broker, across all its
listeners. With enrollment on the main instance, an anonymous client naming a live device's id
on the enrollment listener closed that device's operational session (MQTT session takeover),
and the dynsec plugin of 2.0 has no ``%c`` substitution, so every enrollee shared one role and
could publish requests in any device's name and read a named device's responses. Here:

- Anonymous enrollees connect to this instance only. Its client ids never reach the main
  instance: the bridges connect there under client ids of their own.
- No dynsec. ``acl_file`` patterns keep each client to its own two topics:
  ``pattern write fg/v1/enroll/%c/req`` and ``pattern read fg/v1/enroll/%c/resp``.
  mosquitto.conf(5) of 2.0.11: "Pattern ACLs apply to all users", anonymous ones included.
  2.0's ACL file grants every SUBSCRIBE (its source: "FIXME - implement ACL subscription
  strings") and checks "read" on each message it delivers, so a client may subscribe to
  ``fg/v1/enroll/+/resp`` or ``#`` but receives its own answers only (checked on a running
  2.0.11, as is everything here). Mosquitto refuses every ACL check of a client whose id
  contains ``+`` or ``#`` (CVE-2017-7650); an id with ``/`` expands to a topic with more levels,
  which the bridges do not carry. Bridges are exempt from the ACL file.
- ``per_listener_settings true`` (possible without dynsec) gives each listener its own rules:
  the enrollment listener (server-authenticated TLS) is anonymous with the pattern ACL; the
  monitor listener (loopback) refuses anonymous clients and admits one password account, the
  gateway's monitor, which reads the connection notices (``$SYS/broker/log/#``) and kicks an
  enrollee by taking its client id over.
- Two bridges to the main instance's internal listener, one per direction:
  ``fg/v1/enroll/+/req out 1`` and ``fg/v1/enroll/+/resp in 1``, each logging in as the dynsec
  client whose role grants exactly that (``dynsec.bridge_acls``). So the gateway keeps one
  message client, on the main instance. Why two: Mosquitto 2.0.11 does not set TCP_NODELAY on
  a bridge's socket (``set_tcp_nodelay`` covers accepted sockets only; seen with strace). On one
  bridge carrying both directions, its PUBACK for an answer waits unacknowledged for the main
  instance's delayed ACK (40 ms), and Nagle holds the next request behind it: every request
  after the first took 42 ms (median, measured). A bridge that only sends requests gets its
  ACK with each PUBACK from the main instance (which has TCP_NODELAY), and one that only
  receives answers delays nothing anyone waits for.
- ``try_private`` marks each as a bridge (no echo of its own messages); ``cleansession true``:
  a request lost while a link is down is retried by the device, answers are replayed from the
  registry; ``notifications false``: state messages would need rights on ``$SYS``;
  ``bridge_attempt_unsubscribe false``: nothing to unsubscribe. Their client ids are random and
  secret, fresh at every start: an enrollee that could name a bridge's local id would take that
  session over and cut the link.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.mosquitto.config import (
    DEFAULT_MAX_QUEUED_MESSAGES,
    check_host,
    check_path,
    check_port,
    check_queue_limit,
    check_user,
    common_settings,
)
from gateway.mosquitto.dynsec import PASSWORD_ITERATIONS, check_reserved_username, hash_password
from gateway.protocol import topics

__all__ = [
    "BRIDGE_ANSWERS",
    "BRIDGE_IN",
    "BRIDGE_OUT",
    "BRIDGE_REQUESTS",
    "LOG_TOPICS",
    "EnrollmentConfig",
    "render_enrollment_acl",
    "render_enrollment_config",
    "render_monitor_acl",
    "render_password_file",
]

BRIDGE_REQUESTS = "fleetgate-requests"
BRIDGE_ANSWERS = "fleetgate-answers"
BRIDGE_OUT = topics.ENROLL_REQUEST_FILTER  # enrollees' requests, to the gateway
BRIDGE_IN = f"{topics.PREFIX}/enroll/+/resp"  # the gateway's answers, to enrollees
LOG_TOPICS = "$SYS/broker/log/#"
_SALT_BYTES = 12  # what mosquitto_passwd 2.0.11 uses

# Values written into mosquitto.conf: one token, no space, no line break, no "%" or "#".
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{what} must be 1-128 of A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class EnrollmentConfig:
    """Everything ``render_enrollment_config`` needs; paths absolute, ports chosen (not 0)."""

    run_as_user: str
    log_path: Path
    host: str  # bind address of the enrollment listener
    enrollment_port: int
    monitor_port: int  # always bound to 127.0.0.1
    server_cert_path: Path
    server_key_path: Path
    acl_path: Path  # the enrollment listener's patterns (``render_enrollment_acl``)
    monitor_acl_path: Path  # ``render_monitor_acl``
    password_path: Path  # the monitor's account (``render_password_file``)
    bridge_port: int  # the main instance's internal listener, on 127.0.0.1
    bridge_username: str
    bridge_password: str
    # (client id on the main instance, client id on this one: keep it secret) of each bridge
    bridge_request_clientids: tuple[str, str]
    bridge_answer_clientids: tuple[str, str]
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES

    def __post_init__(self) -> None:
        check_user(self.run_as_user)
        for name in (
            "log_path",
            "server_cert_path",
            "server_key_path",
            "acl_path",
            "monitor_acl_path",
            "password_path",
        ):
            check_path(getattr(self, name), name)
        check_host(self.host)
        ports = [
            check_port(self.enrollment_port, "enrollment_port"),
            check_port(self.monitor_port, "monitor_port"),
            check_port(self.bridge_port, "bridge_port"),
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(f"enrollment, monitor and bridge ports must differ, got {ports}")
        check_reserved_username(_check_token(self.bridge_username, "bridge_username"))
        _check_token(self.bridge_password, "bridge_password")
        clientids: list[str] = []
        for name in ("bridge_request_clientids", "bridge_answer_clientids"):
            pair = getattr(self, name)
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"{name} must be a (remote, local) tuple")
            clientids += [_check_token(value, name) for value in pair]
        if len(set(clientids)) != len(clientids):
            raise ValueError("the bridges' client ids must all differ")
        check_queue_limit(self.max_queued_messages)


def render_enrollment_config(config: EnrollmentConfig) -> str:
    """The complete mosquitto.conf text of the enrollment instance."""
    if not isinstance(config, EnrollmentConfig):
        raise TypeError(f"config must be an EnrollmentConfig, not {type(config).__name__}")
    lines = [
        "# Written by Fleetgate at every start; edits are lost.",
        f"user {config.run_as_user}",
        "per_listener_settings true",
        *common_settings(config.max_queued_messages, config.log_path),
        "",
        "# monitor: the gateway reads connection notices here; one password account, loopback",
        f"listener {config.monitor_port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {config.password_path}",
        f"acl_file {config.monitor_acl_path}",
        "",
        "# enrollment: server-authenticated TLS, anonymous, each client id to its own topics",
        f"listener {config.enrollment_port} {config.host}",
        f"certfile {config.server_cert_path}",
        f"keyfile {config.server_key_path}",
        "allow_anonymous true",
        f"acl_file {config.acl_path}",
        "",
        *_bridge(config, BRIDGE_REQUESTS, config.bridge_request_clientids, f"{BRIDGE_OUT} out 1"),
        *_bridge(config, BRIDGE_ANSWERS, config.bridge_answer_clientids, f"{BRIDGE_IN} in 1"),
    ]
    return "\n".join(lines)


def _bridge(
    config: EnrollmentConfig, name: str, clientids: tuple[str, str], topic: str
) -> list[str]:
    remote, local = clientids
    return [
        f"connection {name}",
        f"address 127.0.0.1:{config.bridge_port}",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "cleansession true",
        "start_type automatic",
        "restart_timeout 1",
        "keepalive_interval 30",
        "notifications false",
        "bridge_attempt_unsubscribe false",
        f"remote_clientid {remote}",
        f"local_clientid {local}",
        f"remote_username {config.bridge_username}",
        f"remote_password {config.bridge_password}",
        f"topic {topic}",
        "",
    ]


def render_enrollment_acl() -> str:
    """The enrollment listener's ACL file: each client its own request and response topic."""
    return "\n".join(
        [
            "# Written by Fleetgate at every start; edits are lost.",
            f"pattern write {topics.PREFIX}/enroll/%c/req",
            f"pattern read {topics.PREFIX}/enroll/%c/resp",
            "",
        ]
    )


def render_monitor_acl(monitor_username: str) -> str:
    """The monitor listener's ACL file: the monitor reads the broker's log, nothing else."""
    name = check_reserved_username(_check_token(monitor_username, "monitor_username"))
    return "\n".join(
        [
            "# Written by Fleetgate at every start; edits are lost.",
            f"user {name}",
            f"topic read {LOG_TOPICS}",
            "",
        ]
    )


def render_password_file(
    username: str, password: str, random_bytes: Callable[[int], bytes]
) -> str:
    """One account in mosquitto_passwd's 2.0 format (``$7$``: PBKDF2-SHA512, checked against a
    line written by mosquitto_passwd 2.0.11)."""
    name = check_reserved_username(_check_token(username, "username"))
    if not isinstance(password, str) or not password or "\n" in password:
        raise ValueError("password must be a non-empty str on one line")
    stored = hash_password(password, random_bytes(_SALT_BYTES), PASSWORD_ITERATIONS)
    return f"{name}:$7${PASSWORD_ITERATIONS}${stored['salt']}${stored['password']}\n"
