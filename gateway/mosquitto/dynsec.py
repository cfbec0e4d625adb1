"""Pure builders of Mosquitto dynamic-security commands (``$CONTROL/dynamic-security/v1``) and
of the plugin's initial JSON file. No I/O: ``broker`` sends what these return.

How the gateway's topic rules (``gateway.acl``) become dynsec objects, as verified on
Mosquitto 2.0.11. Two forms, chosen by ``device_patterns``:

With device patterns (every broker we start, and the cluster's shared broker): the main
instance's ``acl_file`` grants each active device its own topics by ``%u`` pattern
(``gateway.mosquitto.patterns``), which the broker consults only when this plugin defers.

- An active device has no dynsec object at all: becoming active costs no command. A pending
  one neither: the operational listener admits only certificates of our issuing CA, the
  gateway issues one only after the device is active on the broker, and the lifecycle never
  returns to pending, so no pending identity can present a certificate.
- Every other certificate identity is one dynsec *client* (username = identity name = the
  certificate's CN, no password) with one *role* of its own (``dev-<id>``, ``op-<id>``,
  ``svc-<id>``): its grants from ``gateway.acl``, then explicit denies of everything at the
  lowest priority (``deny_rest``), so the plugin decides alone and never defers to the
  patterns. Quarantine is ``createRole`` + ``createClient`` (no disconnect: creating the
  client of a live username does not kick it), release is ``modifyRole`` with no ACLs (the
  plugin defers again and the patterns apply; no disconnect either).
- Revocation keeps the client with a deny-all role and kicks its sessions (``kick_commands``)
  in the same message: the reconnect finds the deny-all role before the CRL refuses the
  handshake. Deleting the client would hand a reconnect back to the patterns.

Without (a broker the operator runs, whose configuration we do not write): every identity,
active devices included, has its client and role, and revocation is ``deleteClient`` (kick;
with no ``acl_file`` a reconnect that finds no client gets the deny-all defaults). That costs
two commands per device that becomes active.

Common to both:

- 2.0 has no ``%u``/``%c`` substitution in dynsec ACL topics (a ``%c`` topic matches only a
  literal ``%c``), hence a role per identity. A client without a password cannot log in with a
  username and password (nor with a username alone): only the certificate gets you that
  username.
- The role's ACL list is the identity's grants in its current state: an exact topic becomes
  ``publishClientSend``, or ``subscribeLiteral`` plus ``publishClientReceive``; a subtree ``R``
  becomes the same types on ``R/#`` with ``subscribePattern``. dynsec's ``subscribePattern``
  admits a filter only when every topic the filter can match lies inside the pattern (``R/#``
  admits ``R/+/x`` and ``R`` but not ``R/../+`` one level up, nor ``#``), which is
  ``TopicAcl``'s rule for wildcards. Defaults deny everything else, receiving included (2.0
  allows receiving by default).
- Quarantine and release edit the role's ACL list in place (adding or removing a *role* on a
  client kicks it, editing a role's ACLs does not). Not ``disableClient`` for revocation: a
  certificate client is never password-checked, so a disabled one reconnects with its rights
  (eclipse/mosquitto issue 2999).
- Kicking a live session without changing rights: add then remove an empty role
  (``_fg_kick``) on the client, one message.

Enrollment: a broker we start serves enrollment from a second instance (``enrollment``), whose
two bridges (one per direction) log in here as one password client with ``bridge_acls``: it may
publish ``fg/v1/enroll/+/req`` and subscribe to / receive ``fg/v1/enroll/+/resp`` (that literal
filter only), nothing else. The main instance refuses anonymous clients, so its initial file
has no anonymous group.

A broker the operator runs (``baseline_commands``) keeps the older single-broker form: anonymous
clients share the group ``_fg_enrollees``, whose role allows publishing to
``fg/v1/enroll/+/req`` and subscribing to / receiving ``fg/v1/enroll/+/resp``, with a
higher-priority deny on the literal filter ``fg/v1/enroll/+/resp`` (no sweeping the fleet's
responses). Without ``%c`` the role cannot be per device: a client that knows a device id can
read that device's challenges and certificates (no secret: a nonce is bound to the device that
asked and only its birth key can use it; certificates are public) and send requests in its name
(the gateway rejects them: attestation binds each request to the birth certificate's device
id), and, sharing one client-id namespace with the operational listener, close that device's
operational session by connecting under its id. Run a separate enrollment broker there too.

What a change costs: the 2.0 plugin rewrites its whole JSON file after *every command* it
accepts (each command handler ends with ``dynsec__config_save()``; a refused one, such as
creating a role that exists, writes nothing). Measured on 2.0.11 with 1,000 devices in the file
(1.6 MB): one ``modifyRole`` 16.6 ms, ten in one message 139 ms, fifty 852 ms; a refused
``createRole`` 0.7 ms. So batching commands into one message saves round trips, not rewrites;
what saves rewrites is sending fewer commands, and a smaller file: with device patterns the
file holds operators, services and the quarantined and revoked devices only, and a device
that becomes active costs nothing. Without them it costs two (``createRole`` with its ACLs,
``createClient`` with its role), and a third (``modifyRole``) only when its role turned out to
exist already (``follow_up``). The plugin of Mosquitto 2.1
marks the file dirty per command and writes it once per message; there, batching saves both.
Every command carries ``correlationData`` (``<batch id>:<index>``) so the answer is matched
even when other tools use the same control topic; ``gateway.mosquitto.commit`` decides what
goes in which message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.acl import (
    filter_is_valid,
    grants,  # one source of truth for the topic rules
)
from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from gateway.protocol import topics
from gateway.store import IdentityState
from pki.profile import IDENTITY_NAME_PATTERN, IdentityKind, check_identity_name

__all__ = [
    "ADMIN_ROLE",
    "BRIDGE_ROLE",
    "CONTROL_TOPIC",
    "DEFAULT_ACL_ACCESS",
    "DEFAULT_ADMIN_USERNAME",
    "DEFAULT_BRIDGE_USERNAME",
    "DEFAULT_INTERNAL_USERNAME",
    "ENROLLEE_GROUP",
    "ENROLLEE_ROLE",
    "INTERNAL_ROLE",
    "KICK_ROLE",
    "PASSWORD_ITERATIONS",
    "RESPONSE_TOPIC",
    "Acl",
    "AclType",
    "Command",
    "CommandResult",
    "Enforcement",
    "Response",
    "add_client_role",
    "admin_acls",
    "baseline_commands",
    "batches",
    "bridge_acls",
    "check_refusals",
    "check_reserved_username",
    "check_results",
    "create_client",
    "create_group",
    "create_role",
    "decode_response",
    "delete_client",
    "delete_role",
    "deny_rest",
    "encode_batch",
    "enforce_commands",
    "enrollee_acls",
    "follow_up",
    "has_objects",
    "hash_password",
    "identity_acls",
    "initial_config",
    "internal_acls",
    "kick_commands",
    "modify_role_acls",
    "needs_objects",
    "order_results",
    "remove_client_role",
    "role_acls",
    "role_name",
    "set_anonymous_group",
    "set_client_password",
    "set_default_acl_access",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

# Names of our own dynsec objects start with "_", which no identity name can (see
# IDENTITY_NAME_PATTERN): no certificate issued by the gateway can carry them as its CN, and a
# certificate's CN is all Mosquitto needs to act as that username.
ADMIN_ROLE = "_fg_admin"
INTERNAL_ROLE = "_fg_internal"
BRIDGE_ROLE = "_fg_bridge"
ENROLLEE_ROLE = "_fg_enrollee"
KICK_ROLE = "_fg_kick"
ENROLLEE_GROUP = "_fg_enrollees"
DEFAULT_ADMIN_USERNAME = "_fg_admin"
DEFAULT_INTERNAL_USERNAME = "_fg_gateway"
DEFAULT_BRIDGE_USERNAME = "_fg_bridge"

# What mosquitto_ctrl 2.0.11 writes. Our passwords are 32 random bytes, so stretching adds
# nothing; the hash only keeps the plain text out of the file.
PASSWORD_ITERATIONS = 101
_SALT_BYTES = 12

_IDENTITY_NAME = re.compile(IDENTITY_NAME_PATTERN)
_ROLE_PREFIX = {
    IdentityKind.DEVICE: "dev",
    IdentityKind.OPERATOR: "op",
    IdentityKind.SERVICE: "svc",
}

# Error texts of the 2.0.11 plugin that mean "already as wanted".
_EXISTS_ROLE = "Role already exists"
_EXISTS_CLIENT = "Client already exists"
_EXISTS_GROUP = "Group already exists"
_NO_CLIENT = "Client not found"
_NO_ROLE = "Role not found"
_ROLE_MISSING = "Role does not exist"  # what modifyRole answers for a missing role

ENROLL_RESPONSE_FILTER = f"{topics.PREFIX}/enroll/+/resp"


class AclType(StrEnum):
    PUBLISH_SEND = "publishClientSend"
    PUBLISH_RECEIVE = "publishClientReceive"
    SUBSCRIBE_LITERAL = "subscribeLiteral"
    SUBSCRIBE_PATTERN = "subscribePattern"
    UNSUBSCRIBE_LITERAL = "unsubscribeLiteral"
    UNSUBSCRIBE_PATTERN = "unsubscribePattern"


# Everything not granted is refused, receiving included (the plugin's default allows it).
DEFAULT_ACL_ACCESS: Mapping[str, bool] = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


def _check_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or "\x00" in value:
        raise ValueError(f"{what} must be a non-empty str without NUL")
    return value


@dataclass(frozen=True)
class Acl:
    acltype: AclType
    topic: str
    allow: bool = True
    priority: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "acltype", AclType(self.acltype))
        if not isinstance(self.topic, str) or not filter_is_valid(self.topic):
            raise ValueError(f"{self.topic!r} is not a valid MQTT topic filter")
        if not isinstance(self.allow, bool):
            raise TypeError("allow must be a bool")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError("priority must be an int")

    def to_json(self) -> dict[str, Any]:
        return {
            "acltype": self.acltype.value,
            "topic": self.topic,
            "priority": self.priority,
            "allow": self.allow,
        }


def check_reserved_username(username: object) -> str:
    """A username for the gateway's own password clients: refused if a certificate could
    carry it as its CN (then that certificate would get these rights without a password)."""
    name = _check_str(username, "username")
    if _IDENTITY_NAME.fullmatch(name) is not None:
        raise ValueError(
            f"username {name!r} could be an identity name (a certificate CN); "
            "use one that does not match IDENTITY_NAME_PATTERN, e.g. starting with '_'"
        )
    return name


def role_name(kind: IdentityKind, identity: str) -> str:
    if not isinstance(kind, IdentityKind):
        raise TypeError(f"kind must be an IdentityKind, not {type(kind).__name__}")
    return f"{_ROLE_PREFIX[kind]}-{check_identity_name(identity)}"


def _subtree(root: tuple[str, ...]) -> str:
    return "/".join((*root, "#"))


def identity_acls(kind: IdentityKind, identity: str, state: IdentityState) -> tuple[Acl, ...]:
    """The role ACLs that make Mosquitto allow what ``gateway.acl.TopicAcl`` allows for this
    identity in this state (nothing for pending and revoked)."""
    if not isinstance(kind, IdentityKind):
        raise TypeError(f"kind must be an IdentityKind, not {type(kind).__name__}")
    check_identity_name(identity)
    state = IdentityState(state)
    granted = grants(kind.value, identity, state)
    if granted.everything:
        return internal_acls()
    acls: list[Acl] = [Acl(AclType.PUBLISH_SEND, t) for t in sorted(granted.publish_exact)]
    acls += [Acl(AclType.PUBLISH_SEND, _subtree(r)) for r in granted.publish_subtrees]
    for topic in sorted(granted.receive_exact):
        acls += [Acl(AclType.SUBSCRIBE_LITERAL, topic), Acl(AclType.PUBLISH_RECEIVE, topic)]
    for root in granted.receive_subtrees:
        acls += [
            Acl(AclType.SUBSCRIBE_PATTERN, _subtree(root)),
            Acl(AclType.PUBLISH_RECEIVE, _subtree(root)),
        ]
    return tuple(acls)


# Below every grant: dynsec sorts a role's ACLs by priority, highest first.
DENY_PRIORITY = -1000


def deny_rest() -> tuple[Acl, ...]:
    """Explicit denies of every application topic at the lowest priority: a matching deny ends
    the broker's check in the plugin, where no match would hand it to the ``acl_file``
    patterns. ``#`` matches no ``$`` topic (MQTT 4.7.2): ``$CONTROL`` and ``$SYS`` stay as the
    role's own ACLs and the defaults say."""
    return (
        Acl(AclType.PUBLISH_SEND, "#", allow=False, priority=DENY_PRIORITY),
        Acl(AclType.PUBLISH_RECEIVE, "#", allow=False, priority=DENY_PRIORITY),
        Acl(AclType.SUBSCRIBE_PATTERN, "#", allow=False, priority=DENY_PRIORITY),
    )


def needs_objects(kind: IdentityKind, state: IdentityState, *, device_patterns: bool) -> bool:
    """Whether the identity needs a dynsec client and role of its own: always without device
    patterns; with them, every identity but an active or pending device (see the module
    docstring)."""
    if not device_patterns or kind is not IdentityKind.DEVICE:
        return True
    return state not in (IdentityState.ACTIVE, IdentityState.PENDING)


def role_acls(
    kind: IdentityKind, identity: str, state: IdentityState, *, device_patterns: bool
) -> tuple[Acl, ...]:
    """The ACL list of the identity's role. With device patterns: none for an active device
    (the plugin defers, the patterns apply), else its grants then ``deny_rest`` (revoked and
    pending: ``deny_rest`` alone). Without: its grants (``identity_acls``)."""
    acls = identity_acls(kind, identity, state)
    if not device_patterns:
        return acls
    if kind is IdentityKind.DEVICE and state is IdentityState.ACTIVE:
        return ()
    return (*acls, *deny_rest())


def enrollee_acls() -> tuple[Acl, ...]:
    """The shared role of anonymous clients (see the module docstring for what it exposes)."""
    return (
        Acl(AclType.PUBLISH_SEND, topics.ENROLL_REQUEST_FILTER),
        # checked first: the wildcard filter itself would read every device's responses
        Acl(AclType.SUBSCRIBE_LITERAL, ENROLL_RESPONSE_FILTER, allow=False, priority=10),
        Acl(AclType.SUBSCRIBE_PATTERN, ENROLL_RESPONSE_FILTER),
        Acl(AclType.PUBLISH_RECEIVE, ENROLL_RESPONSE_FILTER),
    )


def bridge_acls() -> tuple[Acl, ...]:
    """The enrollment instance's bridge: every enrollee's request out, every answer back; the
    subscription only as that one literal filter."""
    return (
        Acl(AclType.PUBLISH_SEND, topics.ENROLL_REQUEST_FILTER),
        Acl(AclType.SUBSCRIBE_LITERAL, ENROLL_RESPONSE_FILTER),
        Acl(AclType.PUBLISH_RECEIVE, ENROLL_RESPONSE_FILTER),
        *deny_rest(),  # nothing of the device patterns either
    )


def internal_acls() -> tuple[Acl, ...]:
    """Every application topic. ``#`` does not match ``$`` topics (MQTT 4.7.2), so this grants
    no ``$CONTROL`` access: the gateway's message client cannot change security."""
    return (
        Acl(AclType.PUBLISH_SEND, "#"),
        Acl(AclType.PUBLISH_RECEIVE, "#"),
        Acl(AclType.SUBSCRIBE_PATTERN, "#"),
    )


def admin_acls() -> tuple[Acl, ...]:
    """Dynamic-security commands and ``$SYS`` (the broker's log notices), nothing else."""
    control = f"{CONTROL_TOPIC.rsplit('/', 1)[0]}/#"
    return (
        Acl(AclType.PUBLISH_SEND, control),
        Acl(AclType.PUBLISH_RECEIVE, control),
        Acl(AclType.SUBSCRIBE_PATTERN, control),
        Acl(AclType.PUBLISH_RECEIVE, "$SYS/#"),
        Acl(AclType.SUBSCRIBE_PATTERN, "$SYS/#"),
        *deny_rest(),  # nothing of the device patterns either
    )


@dataclass(frozen=True)
class Command:
    """One dynsec command; ``tolerated`` are the plugin's error texts that mean the wanted
    state already holds (creating what exists, deleting what is gone)."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    tolerated: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _check_str(self.name, "command name")
        if not isinstance(self.args, Mapping):
            raise TypeError("args must be a mapping")
        if "command" in self.args or "correlationData" in self.args:
            raise ValueError("args must not set 'command' or 'correlationData'")
        object.__setattr__(self, "tolerated", frozenset(self.tolerated))

    def to_json(self, correlation: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"command": self.name, **self.args}
        if correlation is not None:
            body["correlationData"] = correlation
        return body


def _roles_json(roles: Sequence[str]) -> list[dict[str, Any]]:
    return [{"rolename": _check_str(r, "role name")} for r in roles]


def create_role(name: str, acls: Iterable[Acl] = ()) -> Command:
    return Command(
        "createRole",
        {"rolename": _check_str(name, "role name"), "acls": [a.to_json() for a in acls]},
        frozenset({_EXISTS_ROLE}),
    )


def modify_role_acls(name: str, acls: Iterable[Acl], *, if_exists: bool = False) -> Command:
    """Replace the role's whole ACL list at once (no disconnect of its clients). ``if_exists``:
    a missing role is no error (nothing to change there; the refusal writes nothing)."""
    return Command(
        "modifyRole",
        {"rolename": _check_str(name, "role name"), "acls": [a.to_json() for a in acls]},
        frozenset({_NO_ROLE, _ROLE_MISSING}) if if_exists else frozenset(),
    )


def delete_role(name: str) -> Command:
    return Command(
        "deleteRole", {"rolename": _check_str(name, "role name")}, frozenset({_NO_ROLE})
    )


def create_client(
    username: str, *, password: str | None = None, roles: Sequence[str] = ()
) -> Command:
    """A client; without ``password`` it can only be reached through a certificate's CN."""
    args: dict[str, Any] = {"username": _check_str(username, "username")}
    if password is not None:
        args["password"] = _check_str(password, "password")
    args["roles"] = _roles_json(roles)
    return Command("createClient", args, frozenset({_EXISTS_CLIENT}))


def delete_client(username: str) -> Command:
    """Removes the client and kicks every session using its username."""
    return Command(
        "deleteClient", {"username": _check_str(username, "username")}, frozenset({_NO_CLIENT})
    )


def set_client_password(username: str, password: str) -> Command:
    return Command(
        "setClientPassword",
        {
            "username": _check_str(username, "username"),
            "password": _check_str(password, "password"),
        },
    )


def add_client_role(username: str, role: str) -> Command:
    return Command(
        "addClientRole",
        {"username": _check_str(username, "username"), "rolename": _check_str(role, "role name")},
    )


def remove_client_role(username: str, role: str) -> Command:
    return Command(
        "removeClientRole",
        {"username": _check_str(username, "username"), "rolename": _check_str(role, "role name")},
    )


def create_group(name: str, roles: Sequence[str] = ()) -> Command:
    return Command(
        "createGroup",
        {"groupname": _check_str(name, "group name"), "roles": _roles_json(roles)},
        frozenset({_EXISTS_GROUP}),
    )


def set_anonymous_group(name: str) -> Command:
    return Command("setAnonymousGroup", {"groupname": _check_str(name, "group name")})


def set_default_acl_access(access: Mapping[str, bool] = DEFAULT_ACL_ACCESS) -> Command:
    allowed = {"publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"}
    for key, value in access.items():
        if key not in allowed:
            raise ValueError(f"{key!r} is not a default ACL type")
        if not isinstance(value, bool):
            raise TypeError(f"default for {key} must be a bool")
    return Command(
        "setDefaultACLAccess",
        {"acls": [{"acltype": k, "allow": v} for k, v in access.items()]},
    )


@dataclass(frozen=True)
class Enforcement:
    """What the broker must enforce for one identity."""

    identity: str
    kind: IdentityKind
    state: IdentityState

    def __post_init__(self) -> None:
        check_identity_name(self.identity)
        if not isinstance(self.kind, IdentityKind):
            raise TypeError(f"kind must be an IdentityKind, not {type(self.kind).__name__}")
        if not isinstance(self.state, IdentityState):
            raise TypeError(f"state must be an IdentityState, not {type(self.state).__name__}")

    @property
    def role(self) -> str:
        return role_name(self.kind, self.identity)


def enforce_commands(
    target: Enforcement,
    *,
    provisioned: bool,
    device_patterns: bool = False,
    certain: bool = True,
) -> list[Command]:
    """Commands that bring one identity's dynsec objects to ``target``.

    ``provisioned`` says the client and role are known to exist (then one ``modifyRole``
    suffices); otherwise they are created with the role's ACLs inline, and creating what
    exists is tolerated, so the list is safe to send again. A role that existed keeps its old
    ACLs: send ``follow_up`` of the answers next. ``certain``: nobody else changes the plugin
    (a broker we started), so an identity we never gave objects has none; otherwise an active
    or pending device's role, if another gateway made one, is set anyway (one command, which
    the plugin refuses without a rewrite when there is no such role).
    """
    if not isinstance(target, Enforcement):
        raise TypeError(f"target must be an Enforcement, not {type(target).__name__}")
    role = target.role
    if target.state is IdentityState.REVOKED:
        if not device_patterns:
            return [delete_client(target.identity), delete_role(role)]
        # deny first, then cut: the reconnect finds the deny-all role (one message, so no
        # other command of the plugin's comes in between)
        kick = kick_commands(target.identity)
        if provisioned:
            return [modify_role_acls(role, deny_rest()), *kick]
        return [
            create_role(role, deny_rest()),
            modify_role_acls(role, deny_rest()),  # the role may exist with other ACLs
            create_client(target.identity, roles=[role]),
            *kick,
        ]
    acls = role_acls(target.kind, target.identity, target.state, device_patterns=device_patterns)
    if not needs_objects(target.kind, target.state, device_patterns=device_patterns):
        if provisioned:
            return [modify_role_acls(role, acls)]
        return [] if certain else [modify_role_acls(role, acls, if_exists=True)]
    if provisioned:
        return [modify_role_acls(role, acls)]
    return [
        create_role(role, acls),
        create_client(target.identity, roles=[role]),
    ]


def follow_up(
    target: Enforcement,
    commands: Sequence[Command],
    results: Sequence[CommandResult],
    *,
    device_patterns: bool = False,
) -> list[Command]:
    """What ``enforce_commands(target, provisioned=False)`` left undone, judged from its
    answers: the role existed already (created earlier, or by another gateway), so its ACLs
    are set with one ``modifyRole``. Empty in the usual case: one rewrite fewer per device."""
    if len(commands) != len(results):
        raise ValueError("one result per command")
    if any(c.name == "modifyRole" and c.args.get("rolename") == target.role for c in commands):
        return []  # set in the same message already
    for command, result in zip(commands, results, strict=True):
        if (
            command.name == "createRole"
            and command.args.get("rolename") == target.role
            and result.error == _EXISTS_ROLE
        ):
            acls = role_acls(
                target.kind, target.identity, target.state, device_patterns=device_patterns
            )
            return [modify_role_acls(target.role, acls)]
    return []


def has_objects(target: Enforcement, *, device_patterns: bool) -> bool:
    """Whether a client and role of the identity exist once ``target`` is enforced from
    scratch (``enforce_commands(provisioned=False)`` or ``initial_config``)."""
    if target.state is IdentityState.REVOKED:
        return device_patterns  # kept with a deny-all role; deleted without patterns
    return needs_objects(target.kind, target.state, device_patterns=device_patterns)


def kick_commands(username: str) -> list[Command]:
    """Cut every session of ``username`` without changing its rights: a role change on a
    client disconnects it."""
    return [add_client_role(username, KICK_ROLE), remove_client_role(username, KICK_ROLE)]


def baseline_commands(internal_username: str, internal_password: str) -> list[Command]:
    """Our fixed objects, for a broker the operator runs (a broker we start gets them in its
    initial file). The admin client is never touched: a role change on it would cut the very
    connection sending the commands."""
    check_reserved_username(internal_username)
    return [
        set_default_acl_access(),
        create_role(INTERNAL_ROLE, internal_acls()),
        modify_role_acls(INTERNAL_ROLE, internal_acls()),
        create_role(ENROLLEE_ROLE, enrollee_acls()),
        modify_role_acls(ENROLLEE_ROLE, enrollee_acls()),
        create_role(KICK_ROLE),
        create_group(ENROLLEE_GROUP, [ENROLLEE_ROLE]),
        set_anonymous_group(ENROLLEE_GROUP),
        create_client(internal_username, password=internal_password, roles=[INTERNAL_ROLE]),
        set_client_password(internal_username, internal_password),
    ]


def batches(commands: Sequence[Command], size: int) -> list[tuple[Command, ...]]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError("batch size must be a positive int")
    return [tuple(commands[i : i + size]) for i in range(0, len(commands), size)]


def encode_batch(commands: Sequence[Command], batch_id: str) -> bytes:
    """One control message; each command's correlationData is ``<batch_id>:<index>``."""
    _check_str(batch_id, "batch id")
    if ":" in batch_id:
        raise ValueError("batch id must not contain ':'")
    if not commands:
        raise ValueError("a batch needs at least one command")
    body = {"commands": [c.to_json(f"{batch_id}:{i}") for i, c in enumerate(commands)]}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CommandResult:
    command: str
    index: int | None
    error: str | None = None
    data: Any = None


@dataclass(frozen=True)
class Response:
    """A decoded answer. ``batch_id`` is None when it carries no correlation of ours (another
    tool's command on the same topic)."""

    batch_id: str | None
    results: tuple[CommandResult, ...]


def decode_response(payload: bytes) -> Response:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MosquittoError(MosquittoReason.BAD_RESPONSE, f"not JSON: {exc}") from None
    entries = body.get("responses") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise MosquittoError(MosquittoReason.BAD_RESPONSE, "no 'responses' list")
    batch_ids: set[str] = set()
    results: list[CommandResult] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("command"), str):
            raise MosquittoError(MosquittoReason.BAD_RESPONSE, f"malformed entry {entry!r:.200}")
        index: int | None = None
        correlation = entry.get("correlationData")
        if isinstance(correlation, str) and correlation.count(":") == 1:
            batch, _, number = correlation.partition(":")
            if number.isdigit():
                batch_ids.add(batch)
                index = int(number)
        error = entry.get("error")
        results.append(
            CommandResult(
                command=entry["command"],
                index=index,
                error=str(error) if error is not None else None,
                data=entry.get("data"),
            )
        )
    batch_id = batch_ids.pop() if len(batch_ids) == 1 else None
    return Response(batch_id, tuple(results))


def check_results(commands: Sequence[Command], response: Response) -> tuple[CommandResult, ...]:
    """The results in command order; MosquittoError(COMMAND_FAILED) naming every refused
    command whose error is not tolerated."""
    ordered = order_results(commands, response)
    check_refusals(commands, ordered)
    return ordered


def order_results(commands: Sequence[Command], response: Response) -> tuple[CommandResult, ...]:
    """The results in command order; MosquittoError(BAD_RESPONSE) unless every command has
    exactly one."""
    by_index = {r.index: r for r in response.results if r.index is not None}
    if len(by_index) != len(commands) or set(by_index) != set(range(len(commands))):
        raise MosquittoError(
            MosquittoReason.BAD_RESPONSE,
            f"{len(response.results)} answers for {len(commands)} commands",
        )
    return tuple(by_index[i] for i in range(len(commands)))


def check_refusals(commands: Sequence[Command], results: Sequence[CommandResult]) -> None:
    """MosquittoError(COMMAND_FAILED) naming every command of ``commands`` (answered by
    ``results``, in order) that the plugin refused with an error it does not tolerate."""
    failures = tuple(
        (f"{c.name} {_subject(c)}".strip(), r.error)
        for c, r in zip(commands, results, strict=True)
        if r.error is not None and r.error not in c.tolerated
    )
    if failures:
        detail = "; ".join(f"{what}: {error}" for what, error in failures)
        raise MosquittoError(MosquittoReason.COMMAND_FAILED, detail, failures=failures)


def _subject(command: Command) -> str:
    for key in ("username", "rolename", "groupname"):
        value = command.args.get(key)
        if isinstance(value, str):
            return value
    return ""


def hash_password(
    password: str, salt: bytes, iterations: int = PASSWORD_ITERATIONS
) -> dict[str, Any]:
    """The plugin's stored form: PBKDF2-HMAC-SHA512 over the raw salt, both base64 (checked
    against a file written by mosquitto_ctrl 2.0.11)."""
    _check_str(password, "password")
    if not isinstance(salt, bytes) or not salt:
        raise ValueError("salt must be non-empty bytes")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError("iterations must be a positive int")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _role_json(name: str, acls: Iterable[Acl]) -> dict[str, Any]:
    return {"rolename": name, "acls": [a.to_json() for a in acls]}


def initial_config(
    *,
    admin_username: str,
    admin_password: str,
    internal_username: str,
    internal_password: str,
    bridge_username: str,
    bridge_password: str,
    identities: Iterable[Enforcement] = (),
    device_patterns: bool = True,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> dict[str, Any]:
    """The plugin's JSON file for a broker we start: our fixed objects plus every identity in
    its current state, written once instead of as thousands of commands (each of which would
    rewrite the file). Same format as ``mosquitto_ctrl dynsec init`` writes (that tool ships
    with Debian's mosquitto package), which is not used because it takes the admin password
    on its command line, visible to every local user, and creates the admin only."""
    accounts = [
        (check_reserved_username(admin_username), admin_password, ADMIN_ROLE),
        (check_reserved_username(internal_username), internal_password, INTERNAL_ROLE),
        (check_reserved_username(bridge_username), bridge_password, BRIDGE_ROLE),
    ]
    if len({name for name, _, _ in accounts}) != len(accounts):
        raise ValueError("admin, internal and bridge usernames must differ")
    roles = [
        _role_json(ADMIN_ROLE, admin_acls()),
        _role_json(INTERNAL_ROLE, internal_acls()),
        _role_json(BRIDGE_ROLE, bridge_acls()),
        _role_json(KICK_ROLE, ()),
    ]
    clients = [
        {
            "username": name,
            **hash_password(password, random_bytes(_SALT_BYTES)),
            "roles": [{"rolename": role}],
        }
        for name, password, role in accounts
    ]
    seen: set[str] = set()
    for target in identities:
        if not isinstance(target, Enforcement):
            raise TypeError(f"identities must be Enforcement, not {type(target).__name__}")
        if target.identity in seen:
            raise ValueError(f"identity {target.identity!r} is listed twice")
        seen.add(target.identity)
        if not has_objects(target, device_patterns=device_patterns):
            continue
        if target.state is IdentityState.REVOKED:
            acls: tuple[Acl, ...] = deny_rest()
        else:
            acls = role_acls(
                target.kind, target.identity, target.state, device_patterns=device_patterns
            )
        roles.append(_role_json(target.role, acls))
        clients.append({"username": target.identity, "roles": [{"rolename": target.role}]})
    # no anonymous group: the main instance refuses anonymous clients (``config``)
    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
