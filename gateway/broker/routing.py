"""The broker's subscription table, indexed so that routing one message costs what matches it,
not the number of sessions.

amqtt 0.12.1 keeps ``{topic filter: [(session, qos), ...]}`` and, for every published message,
tests the topic against every filter in it: onboarding N devices (each with filters of its
own) costs O(N^2), and at a few thousand connected devices routing took most of the broker's
CPU. This table keeps amqtt's shape (amqtt and its plugins read it as that dict) and adds:

- exact filters (no ``+``/``#``, nearly every device subscription): found by one dict lookup on
  the topic itself;
- wildcard filters, bucketed by their literal prefix (the levels before the first wildcard:
  ``fg/v1/dev/d1/cmd/#`` under ``(fg, v1, dev, d1, cmd)``, ``fg/v1/enroll/+/req`` under
  ``(fg, v1, enroll)``). A topic of n levels looks at its n + 1 prefixes, and each candidate is
  still judged by the broker's own matching function, so wildcard semantics stay amqtt's;
- the filters of each client id, so a session's end and a reconnect touch only its own.

Keys and buckets follow the dict's own key changes; the per-client index is kept by ``record``
and ``discard`` (the broker calls them where amqtt adds or removes a subscriber). Everything handed
out is a snapshot: routing awaits between deliveries, and a subscribe or a session's end in
that gap must neither break the walk nor change what this message reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Subscriber", "SubscriptionTable", "is_wildcard", "literal_prefix"]


class Subscriber(Protocol):
    """What the table needs of amqtt's ``Session``."""

    client_id: str | None


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def literal_prefix(topic_filter: str) -> tuple[str, ...]:
    """The levels of ``topic_filter`` before its first wildcard level."""
    prefix: list[str] = []
    for level in topic_filter.split("/"):
        if "+" in level or "#" in level:
            break
        prefix.append(level)
    return tuple(prefix)


# amqtt's entries are [(Session, qos)] lists; kept as Any so amqtt's objects go in unchanged.
Entry = list[tuple[Any, int]]


class SubscriptionTable(dict[str, Entry]):
    """``{filter: [(session, qos)]}`` as amqtt has it, with the indexes described above."""

    def __init__(self, initial: dict[str, Entry] | None = None) -> None:
        super().__init__()
        self._wildcards: dict[tuple[str, ...], dict[str, None]] = {}
        self._by_client: dict[str, dict[str, None]] = {}
        for topic_filter, entry in (initial or {}).items():
            self[topic_filter] = entry
            for subscriber, _qos in entry:
                self._note(topic_filter, subscriber)

    def __repr__(self) -> str:
        # amqtt 0.12.1 runs ``logger.debug(repr(self._subscriptions))`` on every SUBSCRIBE
        # (broker.py, _client_message_loop): the repr is built whatever the log level, and a
        # dict's repr formats every session of the fleet. O(fleet) per subscribe was half the
        # gateway's CPU at 3,000 devices; a constant repr makes that line free.
        return f"SubscriptionTable({len(self)} filters, {len(self._by_client)} clients)"

    # -- the dict's own key changes keep the wildcard buckets -----------------------------------

    def __setitem__(self, topic_filter: str, entry: Entry) -> None:
        if is_wildcard(topic_filter) and topic_filter not in self:
            bucket = self._wildcards.setdefault(literal_prefix(topic_filter), {})
            bucket[topic_filter] = None
        super().__setitem__(topic_filter, entry)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        if is_wildcard(topic_filter):
            prefix = literal_prefix(topic_filter)
            bucket = self._wildcards.get(prefix, {})
            bucket.pop(topic_filter, None)
            if not bucket:
                self._wildcards.pop(prefix, None)

    def setdefault(self, topic_filter: str, default: Entry | None = None) -> Entry:
        if topic_filter not in self:
            self[topic_filter] = default if default is not None else []
        return self[topic_filter]

    _MISSING: Any = object()

    def pop(self, topic_filter: str, default: Any = _MISSING) -> Any:
        if topic_filter not in self:
            if default is SubscriptionTable._MISSING:
                raise KeyError(topic_filter)
            return default
        entry = self[topic_filter]
        del self[topic_filter]
        for subscriber, _qos in entry:
            self._unnote(topic_filter, subscriber.client_id)
        return entry

    def clear(self) -> None:
        super().clear()
        self._wildcards.clear()
        self._by_client.clear()

    def _unsupported(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("SubscriptionTable changes through item assignment, del, pop, clear")

    update = popitem = __ior__ = _unsupported

    def items(self) -> list[tuple[str, Entry]]:  # type: ignore[override]
        """A snapshot: amqtt walked this dict across awaits, and a subscribe meanwhile killed
        the walk (RuntimeError: dictionary changed size during iteration)."""
        return list(super().items())

    # -- subscribers ----------------------------------------------------------------------------

    def _note(self, topic_filter: str, subscriber: Subscriber) -> None:
        if subscriber.client_id is not None:
            self._by_client.setdefault(subscriber.client_id, {})[topic_filter] = None

    def _unnote(self, topic_filter: str, client_id: str | None) -> None:
        filters = self._by_client.get(client_id or "")
        if filters is not None:
            filters.pop(topic_filter, None)
            if not filters:
                del self._by_client[client_id or ""]

    def record(self, topic_filter: str, subscriber: Subscriber) -> None:
        """Note that ``subscriber`` is under ``topic_filter`` (amqtt's ``add_subscription``
        appends the entry itself; this keeps the per-client index in step)."""
        if any(s.client_id == subscriber.client_id for s, _ in self.get(topic_filter, ())):
            self._note(topic_filter, subscriber)

    def discard(self, topic_filter: str, client_id: str | None) -> int:
        """Unsubscribe ``client_id`` from ``topic_filter``; a filter left without subscribers
        goes. Returns how many entries went (0 or 1)."""
        entry = self.get(topic_filter)
        removed = 0
        if entry is not None:
            for index, (subscriber, _qos) in enumerate(entry):
                if subscriber.client_id == client_id:
                    del entry[index]
                    removed = 1
                    break
            if not entry:
                del self[topic_filter]
        self._unnote(topic_filter, client_id)
        return removed

    def discard_client(self, client_id: str | None) -> list[str]:
        """Every subscription of ``client_id`` goes; returns the filters it had."""
        filters = list(self._by_client.get(client_id or "", ()))
        for topic_filter in filters:
            self.discard(topic_filter, client_id)
        return filters

    def filters_of(self, client_id: str | None) -> list[str]:
        return list(self._by_client.get(client_id or "", ()))

    # -- routing --------------------------------------------------------------------------------

    def matching(
        self, topic: str, matches: Callable[[str, str], bool]
    ) -> list[tuple[str, Entry]]:
        """The filters ``topic`` may reach and a snapshot of their subscribers: the exact filter
        equal to the topic, and each wildcard filter sharing a literal prefix with the topic
        that ``matches(topic, filter)`` accepts. Each filter appears once."""
        found: list[tuple[str, Entry]] = []
        exact = self.get(topic)
        if exact and not is_wildcard(topic):
            found.append((topic, list(exact)))
        if self._wildcards:
            levels = topic.split("/")
            for size in range(len(levels) + 1):
                bucket = self._wildcards.get(tuple(levels[:size]))
                if bucket is None:
                    continue
                for topic_filter in list(bucket):
                    if matches(topic, topic_filter):
                        entry = self.get(topic_filter)
                        if entry:
                            found.append((topic_filter, list(entry)))
        return found
