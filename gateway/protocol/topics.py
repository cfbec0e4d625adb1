"""Every MQTT topic of protocol v1, built and parsed in one place.

The enrollment core, the device state machine and the broker's ACL all use these functions, so
a topic is spelled once. Device ids are checked against ``pki.profile.IDENTITY_NAME_PATTERN``:
that pattern has no ``/``, ``+`` or ``#``, so an id can never reach another device's topics.

    fg/v1/enroll/<id>/req          device -> gateway   (enrollment listener)
    fg/v1/enroll/<id>/resp         gateway -> device
    fg/v1/dev/<id>/renew/req       device -> gateway   (operational listener, mutual TLS)
    fg/v1/dev/<id>/renew/resp      gateway -> device
    fg/v1/dev/<id>/telemetry       device -> applications
    fg/v1/dev/<id>/state           device -> applications
    fg/v1/dev/<id>/cmd/...         applications -> device
    fg/v1/dev/<id>/quarantine/...  a quarantined device's only outlet
    fg/v1/pki/ca, fg/v1/pki/crl    retained, gateway -> everyone
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pki.profile import IDENTITY_NAME_PATTERN

PREFIX = "fg/v1"
CA_TOPIC = f"{PREFIX}/pki/ca"  # retained: issuing CA and root, PEM
CRL_TOPIC = f"{PREFIX}/pki/crl"  # retained: the current CRL, PEM
# What the gateway subscribes to: every device's requests on both listeners.
ENROLL_REQUEST_FILTER = f"{PREFIX}/enroll/+/req"
RENEW_REQUEST_FILTER = f"{PREFIX}/dev/+/renew/req"
GATEWAY_SUBSCRIPTIONS = (ENROLL_REQUEST_FILTER, RENEW_REQUEST_FILTER)

_DEVICE_ID = re.compile(IDENTITY_NAME_PATTERN)


class Channel(StrEnum):
    """Which conversation a request belongs to; each has its own listener."""

    ENROLL = "enroll"  # server-authenticated TLS: hello, enroll, token_enroll
    RENEW = "renew"  # mutual TLS with the operational certificate: renew


def valid_device_id(device_id: str) -> bool:
    return _DEVICE_ID.fullmatch(device_id) is not None


def _checked(device_id: str) -> str:
    if not valid_device_id(device_id):
        raise ValueError(f"{device_id!r} is not a valid device id")
    return device_id


def enroll_request(device_id: str) -> str:
    return f"{PREFIX}/enroll/{_checked(device_id)}/req"


def enroll_response(device_id: str) -> str:
    return f"{PREFIX}/enroll/{_checked(device_id)}/resp"


def renew_request(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/renew/req"


def renew_response(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/renew/resp"


def telemetry(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/telemetry"


def state(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/state"


def command(device_id: str, name: str) -> str:
    if not name or "+" in name or "#" in name:
        raise ValueError(f"{name!r} is not a command name")
    return f"{PREFIX}/dev/{_checked(device_id)}/cmd/{name}"


def commands_filter(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/cmd/#"


def quarantine(device_id: str, name: str = "telemetry") -> str:
    if not name or "+" in name or "#" in name:
        raise ValueError(f"{name!r} is not a quarantine sub-topic")
    return f"{PREFIX}/dev/{_checked(device_id)}/quarantine/{name}"


def quarantine_filter(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/quarantine/#"


def request_topic(channel: Channel, device_id: str) -> str:
    return enroll_request(device_id) if channel is Channel.ENROLL else renew_request(device_id)


def response_topic(channel: Channel, device_id: str) -> str:
    return enroll_response(device_id) if channel is Channel.ENROLL else renew_response(device_id)


@dataclass(frozen=True)
class RequestTopic:
    device_id: str
    channel: Channel

    @property
    def response(self) -> str:
        return response_topic(self.channel, self.device_id)


def parse_request_topic(topic: str) -> RequestTopic | None:
    """The device and channel of a request topic; ``None`` for any other topic."""
    parts = topic.split("/")
    if parts[:2] != ["fg", "v1"] or not valid_device_id(parts[3] if len(parts) > 3 else ""):
        return None
    if len(parts) == 5 and parts[2] == "enroll" and parts[4] == "req":
        return RequestTopic(parts[3], Channel.ENROLL)
    if len(parts) == 6 and parts[2] == "dev" and parts[4:] == ["renew", "req"]:
        return RequestTopic(parts[3], Channel.RENEW)
    return None


def device_of(topic: str) -> str | None:
    """The device id a per-device topic (``fg/v1/enroll/<id>/...``, ``fg/v1/dev/<id>/...``)
    belongs to; ``None`` for shared and foreign topics."""
    parts = topic.split("/")
    if len(parts) >= 5 and parts[:2] == ["fg", "v1"] and parts[2] in ("enroll", "dev"):
        return parts[3] if valid_device_id(parts[3]) else None
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 filter matching (section 4.7): ``+`` one level, ``#`` the rest (and the
    parent level itself); filters starting with a wildcard do not match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_parts = topic_filter.split("/")
    topic_parts = topic.split("/")
    for index, part in enumerate(filter_parts):
        if part == "#":
            return index == len(filter_parts) - 1
        if index >= len(topic_parts):
            return False
        if part != "+" and part != topic_parts[index]:
            return False
    return len(filter_parts) == len(topic_parts)
