"""What Mosquitto 2.0.11 can tell the gateway about what an identity did (``gateway.observe``),
and what it costs. Pure: ``published`` turns a message the gateway's own client received into
an observation.

Measured on 2.0.11 (dynsec, a device publishing to an allowed and a refused topic, subscribing
to an allowed and a refused filter):

- Sessions: the notices on ``$SYS/broker/log/N`` (``sessions``) give ``Connected`` and
  ``Disconnected``; ``MosquittoBroker(observer=...)`` reports them, for certificate identities.
- Publishes, allowed or refused: ``Received PUBLISH from <client> (d0, q1, r0, m1, '<topic>',
  ... (<n> bytes))`` and ``Denied PUBLISH from <client> (...)``, without the payload, but only
  at ``log_type debug``, and Mosquitto never sends debug lines to ``log_dest topic``: only to a
  file, stdout or syslog, which the gateway would have to tail and parse line by line. Cost
  with ``log_type debug`` to a file, 40,000 QoS 1 publishes (half refused) from one client,
  one subscriber: the broker's CPU per message rose from 15.5 to 20.5 and from 17.8 to 28.5 µs
  (two runs), and the log grew by 271 bytes per message (a PUBACK line too, and a line per
  delivery): 23 GB a day at 1,000 messages a second, before the gateway parses any of it.
- Subscriptions: ``log_type subscribe`` publishes ``<client> <qos> <filter>`` on
  ``$SYS/broker/log/M/subscribe`` for granted filters only. A refused filter appears only in
  the debug lines (``Received SUBSCRIBE from <client>`` then ``\\t<filter> (QoS 1)``, with no
  granted line after it); SUBACK codes are not logged.
- Deliveries the ACL refuses (``publishClientReceive``) are not logged at all.

So on Mosquitto ``Denied`` is not reported (turning on debug logging for it would cost the
broker a third more CPU per message and fill the disk), and ``Published`` comes from the
gateway's own message client: subscribed to ``DEVICE_PUBLISH_FILTERS`` (the internal account
may read every application topic), it receives each device message the ACL let through, and
``published(topic, len(payload))`` names the device by its topic. That attribution is sound:
only the device itself may publish under its own ``fg/v1/dev/<id>/`` telemetry, state,
quarantine and renewal topics (``gateway.acl``), besides the gateway's own clients, which
never do. The price is every device message crossing into Python (~0.25 ms of the gateway's
CPU each with aiomqtt, the notes' figure): at 1,000 messages a second a quarter of a core.
Limits: a message the broker drops before delivery (a full queue) is not seen, and QoS 0
messages can be lost between the broker and the gateway.
"""

from __future__ import annotations

from gateway.observe import Published
from gateway.protocol import topics

__all__ = ["DEVICE_PUBLISH_FILTERS", "published"]

# What a device publishes, for the gateway's message client to subscribe to. Renewal
# requests (``topics.RENEW_REQUEST_FILTER``) reach the gateway already.
DEVICE_PUBLISH_FILTERS = (
    f"{topics.PREFIX}/dev/+/telemetry",
    f"{topics.PREFIX}/dev/+/state",
    f"{topics.PREFIX}/dev/+/quarantine/#",
)

_PREFIX_LEVELS = topics.PREFIX.split("/")


def published(topic: str, size: int) -> Published | None:
    """The observation for a message of ``size`` payload bytes received on ``topic``; None
    when the topic is not one only its device may publish to."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, not {type(topic).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size must be a non-negative int")
    levels = topic.split("/")
    prefix = len(_PREFIX_LEVELS)
    if levels[:prefix] != _PREFIX_LEVELS or len(levels) < prefix + 3:
        return None
    section, device, rest = levels[prefix], levels[prefix + 1], levels[prefix + 2 :]
    if section != "dev" or not topics.valid_device_id(device):
        return None
    # the quarantine subtree includes its root (``gateway.acl``, dynsec's ``R/#``)
    if rest in (["telemetry"], ["state"], ["renew", "req"]) or rest[0] == "quarantine":
        return Published(device, topic, size)
    return None
