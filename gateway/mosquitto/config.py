"""mosquitto.conf for the gateway's own Mosquitto 2.0 main instance, rendered by a pure
function. Enrollment runs on a second instance (``enrollment``), bridged to this one.

Decisions, checked against the 2.0.11 manual (mosquitto.conf(5)) and a running 2.0.11:

- ``per_listener_settings false``: the dynamic-security plugin must be global (loading it per
  listener is unsupported).
- ``allow_anonymous false``: every client here has credentials, a certificate on the operational
  listener or a password on the internal one. Anonymous enrollees live on the enrollment
  instance: one broker shares one client-id namespace across its listeners, so an anonymous
  client naming a live device's id would close that device's operational session (MQTT
  session takeover), and 2.0 dynsec has no ``%c`` to keep each enrollee to its own topics.
- ``use_username_as_clientid`` is a listener option, outside the per_listener_settings list,
  so it applies to the operational listener alone, even with per_listener_settings false. With
  ``use_identity_as_username`` the username is the certificate's CN, so the client id becomes
  the identity name whatever the device sends: no device can take over another's session
  (verified on 2.0.11: a certificate for ``devA`` connecting as ``zzz`` appears as ``devA``).
  A certificate client is never password-checked, so ``allow_anonymous false`` does not touch it.
- ``user``: when started as root, Mosquitto 2 switches to the ``mosquitto`` user, which cannot
  read the run directory (mode 0700, keys 0600). Naming the user the gateway runs as keeps the
  broker at exactly the gateway's privileges (for a non-root gateway the option is ignored).
- ``log_dest topic``: notices go to ``$SYS/broker/log/N`` as well as the file, which is how the
  gateway learns who is connected (``sessions``): 2.0 has no API listing clients.
- ``persistence false``: the registry is the truth; nothing of value lives in the broker.
- ``acl_file``: active devices' own topics as ``%u`` patterns (``patterns``), consulted only
  when the dynamic-security plugin has no say (no client of that username, no matching ACL):
  an active device needs no dynsec object.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_QUEUED_MESSAGES",
    "MosquittoConfig",
    "check_host",
    "check_path",
    "check_port",
    "check_queue_limit",
    "check_user",
    "render_config",
]

# Mosquitto's default of 1000 silently drops messages for a slow subscriber (the gateway
# during an enrollment burst); changing it needs a restart.
DEFAULT_MAX_QUEUED_MESSAGES = 100_000

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")


def check_path(value: object, what: str) -> Path:
    if not isinstance(value, Path):
        raise TypeError(f"{what} must be a Path, not {type(value).__name__}")
    text = str(value)
    if not value.is_absolute():
        raise ValueError(f"{what} must be an absolute path, got {text!r}")
    # Mosquitto reads one option per line and splits values on spaces: a newline would inject
    # an option, a space would cut the path.
    if any(ch.isspace() or ch == "\x00" for ch in text):
        raise ValueError(f"{what} must not contain whitespace or NUL: {text!r}")
    return value


def check_port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 < value < 65536:
        raise ValueError(f"{what} must be between 1 and 65535, got {value}")
    return value


def check_host(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"host must be a str, not {type(value).__name__}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if _HOSTNAME.fullmatch(value) is None:
            raise ValueError(f"host {value!r} is neither an IP address nor a host name") from None
    return value


def check_user(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("run_as_user must be a str")
    if _USER.fullmatch(value) is None:
        raise ValueError(f"run_as_user {value!r} is not a user name")
    return value


def check_queue_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("max_queued_messages must be an int")
    if value < 1:
        raise ValueError("max_queued_messages must be positive")
    return value


@dataclass(frozen=True)
class MosquittoConfig:
    """Everything ``render_config`` needs; every path absolute, every port chosen (not 0)."""

    run_as_user: str
    plugin_path: Path
    dynsec_path: Path
    log_path: Path
    host: str  # bind address of the operational listener
    internal_port: int  # always bound to 127.0.0.1
    operational_port: int
    server_cert_path: Path  # server certificate, then the issuing CA
    server_key_path: Path
    client_ca_path: Path  # issuing CA + root: who may present an operational certificate
    crl_path: Path
    device_acl_path: Path  # ``patterns.render_device_patterns``
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES

    def __post_init__(self) -> None:
        check_user(self.run_as_user)
        for name in (
            "plugin_path",
            "dynsec_path",
            "device_acl_path",
            "log_path",
            "server_cert_path",
            "server_key_path",
            "client_ca_path",
            "crl_path",
        ):
            check_path(getattr(self, name), name)
        check_host(self.host)
        internal = check_port(self.internal_port, "internal_port")
        if check_port(self.operational_port, "operational_port") == internal:
            raise ValueError(f"listener ports must differ, got {internal} twice")
        check_queue_limit(self.max_queued_messages)


def common_settings(max_queued_messages: int, log_path: Path) -> list[str]:
    """Queueing, latency and logging lines both of our Mosquitto instances use."""
    return [
        f"max_queued_messages {max_queued_messages}",
        # request -> reply over MQTT waits 40-90 ms on delayed ACKs without it (measured)
        "set_tcp_nodelay true",
        "persistence false",
        f"log_dest file {log_path}",
        # connection notices on $SYS/broker/log: how the gateway learns who is connected
        "log_dest topic",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
    ]


def render_config(config: MosquittoConfig) -> str:
    """The complete mosquitto.conf text for ``config``."""
    if not isinstance(config, MosquittoConfig):
        raise TypeError(f"config must be a MosquittoConfig, not {type(config).__name__}")
    lines = [
        "# Written by Fleetgate at every start; edits are lost.",
        f"user {config.run_as_user}",
        "per_listener_settings false",
        "allow_anonymous false",
        *common_settings(config.max_queued_messages, config.log_path),
        f"plugin {config.plugin_path}",
        f"plugin_opt_config_file {config.dynsec_path}",
        # asked only when dynsec defers: active devices' own topics (``patterns``)
        f"acl_file {config.device_acl_path}",
        "",
        "# internal: the gateway's own clients and the enrollment bridge, password, loopback only",
        f"listener {config.internal_port} 127.0.0.1",
        "",
        "# operational: mutual TLS with a certificate from the issuing CA; CN = identity",
        f"listener {config.operational_port} {config.host}",
        f"cafile {config.client_ca_path}",
        f"certfile {config.server_cert_path}",
        f"keyfile {config.server_key_path}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {config.crl_path}",
        "",
    ]
    return "\n".join(lines)
