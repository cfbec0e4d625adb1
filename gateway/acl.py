"""Who may connect to the broker, and which topics each principal may publish, subscribe to and
receive. Pure: no broker import, so the same rules serve the embedded broker and its tests.

The identity state is read through a callback on every decision, so quarantining or revoking a
device takes effect on its very next message, without a reconnect.

Rules (topic scheme in ``gateway.protocol.topics``):

- enrollee (enrollment listener, no certificate, client id = device id): publish
  ``fg/v1/enroll/<id>/req``, subscribe/receive ``fg/v1/enroll/<id>/resp``; nothing else.
- device (operational listener, its certificate names it), active: publish ``.../telemetry``,
  ``.../state``, ``.../renew/req``; subscribe/receive ``.../renew/resp``, ``.../cmd`` and below,
  ``fg/v1/pki/ca``, ``fg/v1/pki/crl``. Quarantined: publish only ``.../quarantine`` and below,
  receive only ``.../renew/resp`` (where the refusal of a renewal sent just before the
  quarantine arrives; later renewal requests are not delivered).
- operator (active): publish ``fg/v1/admin/<own>/req``; subscribe/receive
  ``fg/v1/admin/<own>/resp`` and ``fg/v1/admin/events``; nothing else.
- service ``gateway`` and the internal principal: everything.

A subscription filter with ``+`` or ``#`` is granted only when every topic it can match is
granted, so no wildcard reaches across devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Literal, Protocol, get_args

from gateway.protocol import topics
from gateway.store import IdentityState
from pki.profile import IDENTITY_NAME_PATTERN

__all__ = [
    "LISTENER_ENROLLMENT",
    "LISTENER_INTERNAL",
    "LISTENER_OPERATIONAL",
    "Action",
    "Principal",
    "PrincipalKind",
    "Refusal",
    "StateLookup",
    "TopicAcl",
    "filter_is_valid",
]

LISTENER_ENROLLMENT = "enrollment"
LISTENER_OPERATIONAL = "operational"
LISTENER_INTERNAL = "internal"

# The one service certificate that acts for the gateway itself on the operational listener.
GATEWAY_SERVICE_NAME = "gateway"

PrincipalKind = Literal["enrollee", "device", "operator", "service", "internal"]
_KINDS: frozenset[str] = frozenset(get_args(PrincipalKind))

# Where each kind of principal is allowed to come from: a device certificate presented on the
# enrollment listener (or an enrollee on the operational one) means a wiring mistake.
_LISTENER_OF_KIND: dict[str, str] = {
    "enrollee": LISTENER_ENROLLMENT,
    "device": LISTENER_OPERATIONAL,
    "operator": LISTENER_OPERATIONAL,
    "service": LISTENER_OPERATIONAL,
    "internal": LISTENER_INTERNAL,
}

_NAME = re.compile(IDENTITY_NAME_PATTERN)
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
# MQTT strings are at most 65535 bytes; a longer "topic" is an attack, not a topic.
_MAX_TOPIC_BYTES = 65535


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


class Refusal(StrEnum):
    """Why ``TopicAcl.admits`` turned a connection away; stable codes for logs and the console."""

    NOT_ENROLLED = "not_enrolled"
    DEVICE_PENDING = "device_pending"
    DEVICE_REVOKED = "device_revoked"
    IDENTITY_PENDING = "identity_pending"
    IDENTITY_REVOKED = "identity_revoked"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    WRONG_LISTENER = "wrong_listener"


@dataclass(frozen=True)
class Principal:
    """Who is on the other end of one MQTT connection, as the broker established it."""

    kind: PrincipalKind
    name: str
    listener: str
    cert_fingerprint: str | None = None  # sha256 hex of the client certificate DER
    serial: int | None = None  # the client certificate's serial number

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {self.kind!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, not {type(self.name).__name__}")
        if _NAME.fullmatch(self.name) is None:
            raise ValueError(f"name {self.name!r} does not match {IDENTITY_NAME_PATTERN}")
        if not isinstance(self.listener, str) or not self.listener:
            raise ValueError("listener must be a non-empty str")
        if self.cert_fingerprint is not None and (
            not isinstance(self.cert_fingerprint, str)
            or _FINGERPRINT.fullmatch(self.cert_fingerprint) is None
        ):
            raise ValueError("cert_fingerprint must be 64 lower-case hex digits")
        if self.serial is not None and (
            isinstance(self.serial, bool) or not isinstance(self.serial, int) or self.serial <= 0
        ):
            raise ValueError("serial must be a positive int")

    @property
    def identity(self) -> tuple[str, str]:
        """What two connections must share to be "the same client" (certificate renewal keeps
        kind and name, so a renewed device may take over its own earlier session)."""
        return (self.kind, self.name)


class StateLookup(Protocol):
    def __call__(self, identity_id: str) -> IdentityState | None: ...


def filter_is_valid(topic_filter: str) -> bool:
    """MQTT 3.1.1 section 4.7: ``#`` only as the whole last level, ``+`` only as a whole level,
    no NUL, not empty, at most 65535 bytes."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        return False
    if len(topic_filter.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _topic_is_valid(topic: str) -> bool:
    return filter_is_valid(topic) and "+" not in topic and "#" not in topic


@dataclass(frozen=True)
class Grants:
    """Topics one principal in one state may use. ``exact`` holds whole topics, ``subtrees``
    holds level lists whose topic and everything below it is granted; ``everything`` is the
    root subtree (gateway and internal principals)."""

    publish_exact: frozenset[str] = frozenset()
    publish_subtrees: tuple[tuple[str, ...], ...] = ()
    receive_exact: frozenset[str] = frozenset()
    receive_subtrees: tuple[tuple[str, ...], ...] = ()
    everything: bool = False


_NOTHING = Grants()
_EVERYTHING = Grants(everything=True)


def _levels(topic: str) -> tuple[str, ...]:
    return tuple(topic.split("/"))


def _dev(name: str, *rest: str) -> str:
    return "/".join((topics.PREFIX, "dev", name, *rest))


@lru_cache(maxsize=8192)
def grants(kind: str, name: str, state: IdentityState | None) -> Grants:
    """Grants are a pure function of (kind, name, state): cached, because the broker asks for
    every message it routes."""
    if kind == "internal":
        return _EVERYTHING
    if kind == "enrollee":
        if state is IdentityState.REVOKED:
            return _NOTHING
        return Grants(
            publish_exact=frozenset({topics.enroll_request(name)}),
            receive_exact=frozenset({topics.enroll_response(name)}),
        )
    if state not in (IdentityState.ACTIVE, IdentityState.QUARANTINED):
        return _NOTHING
    if kind == "service":
        if name == GATEWAY_SERVICE_NAME and state is IdentityState.ACTIVE:
            return _EVERYTHING
        return _NOTHING
    if kind == "operator":
        if state is not IdentityState.ACTIVE:
            return _NOTHING
        # Exact topics, no subtree: an operator's replies can carry device details another
        # operator's role does not let it ask for.
        return Grants(
            publish_exact=frozenset({f"{topics.PREFIX}/admin/{name}/req"}),
            receive_exact=frozenset(
                {f"{topics.PREFIX}/admin/{name}/resp", f"{topics.PREFIX}/admin/events"}
            ),
        )
    if kind == "device":
        if state is IdentityState.QUARANTINED:
            return Grants(
                publish_subtrees=(_levels(_dev(name, "quarantine")),),
                receive_exact=frozenset({topics.renew_response(name)}),
            )
        return Grants(
            publish_exact=frozenset(
                {topics.telemetry(name), topics.state(name), topics.renew_request(name)}
            ),
            receive_exact=frozenset(
                {topics.renew_response(name), topics.CA_TOPIC, topics.CRL_TOPIC}
            ),
            receive_subtrees=(_levels(_dev(name, "cmd")),),
        )
    return _NOTHING


def _topic_granted(
    topic: str, exact: frozenset[str], subtrees: tuple[tuple[str, ...], ...]
) -> bool:
    if topic in exact:
        return True
    levels = topic.split("/")
    return any(tuple(levels[: len(root)]) == root for root in subtrees)


def _filter_covered(
    topic_filter: str, exact: frozenset[str], subtrees: tuple[tuple[str, ...], ...]
) -> bool:
    """True when every topic ``topic_filter`` can match is granted.

    A filter without wildcards is one topic. With a wildcard, the wildcard level can take
    infinitely many values, so no finite set of exact topics (nor subtrees rooted at or below
    that level) can cover it: only a subtree whose root lies wholly in the filter's literal
    prefix does.
    """
    levels = topic_filter.split("/")
    first_wildcard = next((i for i, level in enumerate(levels) if level in ("+", "#")), None)
    if first_wildcard is None:
        return _topic_granted(topic_filter, exact, subtrees)
    literal_prefix = tuple(levels[:first_wildcard])
    return any(
        len(root) <= len(literal_prefix) and literal_prefix[: len(root)] == root
        for root in subtrees
    )


class TopicAcl:
    """The broker's policy: ``admits`` at CONNECT, ``allows`` for every publish, subscribe and
    delivery. Both read the identity state through ``state_of`` each time."""

    def __init__(self, state_of: StateLookup) -> None:
        if not callable(state_of):
            raise TypeError("state_of must be callable")
        self._state_of = state_of

    def _state(self, principal: Principal) -> IdentityState | None:
        if principal.kind == "internal":
            return None
        return self._state_of(principal.name)

    def admits(self, principal: Principal, client_id: str | None = None) -> str | None:
        """``None`` if ``principal`` may connect (with MQTT client id ``client_id``, when
        given); otherwise a ``Refusal`` code."""
        if not isinstance(principal, Principal):
            raise TypeError(f"principal must be a Principal, not {type(principal).__name__}")
        if _LISTENER_OF_KIND[principal.kind] != principal.listener:
            return Refusal.WRONG_LISTENER
        if principal.kind == "internal":
            # The internal client's id is its own business; the password already vouched for it.
            return None
        if client_id is not None and client_id != principal.name:
            # A device cannot take another's client id (and with it, another's session).
            return Refusal.CLIENT_ID_MISMATCH
        state = self._state(principal)
        if principal.kind == "enrollee":
            # Unknown, pending, active (re-attesting) and quarantined devices may all talk to the
            # enrollment service, which gives each its answer; a revoked one is final.
            return Refusal.DEVICE_REVOKED if state is IdentityState.REVOKED else None
        if state is None:
            return Refusal.NOT_ENROLLED
        if principal.kind == "device":
            if state is IdentityState.PENDING:
                return Refusal.DEVICE_PENDING
            if state is IdentityState.REVOKED:
                return Refusal.DEVICE_REVOKED
            return None
        if state is IdentityState.PENDING:
            return Refusal.IDENTITY_PENDING
        if state is IdentityState.REVOKED:
            return Refusal.IDENTITY_REVOKED
        return None

    def allows(self, principal: Principal, action: Action, topic: str) -> bool:
        if not isinstance(principal, Principal):
            raise TypeError(f"principal must be a Principal, not {type(principal).__name__}")
        action = Action(action)
        if not isinstance(topic, str):
            return False
        if _LISTENER_OF_KIND[principal.kind] != principal.listener:
            return False
        granted = grants(principal.kind, principal.name, self._state(principal))
        if action is Action.SUBSCRIBE:
            if not filter_is_valid(topic):
                return False
            if granted.everything:
                return True
            return _filter_covered(topic, granted.receive_exact, granted.receive_subtrees)
        if not _topic_is_valid(topic):
            return False
        if granted.everything:
            return True
        if action is Action.PUBLISH:
            return _topic_granted(topic, granted.publish_exact, granted.publish_subtrees)
        return _topic_granted(topic, granted.receive_exact, granted.receive_subtrees)
