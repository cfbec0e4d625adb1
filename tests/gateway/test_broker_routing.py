"""The embedded broker's indexed subscription table: the same deliveries as amqtt's walk of
every filter, without the walk. The table alone, then the broker with many real TLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import aiomqtt
import pytest
from amqtt.broker import Broker
from test_broker_embedded import (  # the broker test kit: PKI, clients, spy
    Env,
    Pki,
    collecting,
    granted,
    make_env,
    pki_env,
    settle,
)

from gateway.broker.routing import SubscriptionTable, literal_prefix
from gateway.store import IdentityState

__all__ = ["pki_env"]  # a fixture, imported for the tests below

# amqtt's own matching function, the judge of every wildcard filter
amqtt_matches = partial(Broker._matches, SimpleNamespace(logger=logging.getLogger("test")))


@dataclass(frozen=True)
class Sub:
    client_id: str


def subscribe(table: SubscriptionTable, topic_filter: str, client_id: str, qos: int = 1) -> None:
    """What amqtt's add_subscription does to the table, then the broker's record()."""
    entry = table.setdefault(topic_filter)
    if all(s.client_id != client_id for s, _ in entry):
        entry.append((Sub(client_id), qos))
    table.record(topic_filter, Sub(client_id))


def reached(table: SubscriptionTable, topic: str) -> list[tuple[str, str]]:
    return sorted(
        (topic_filter, s.client_id)
        for topic_filter, entry in table.matching(topic, amqtt_matches)
        for s, _ in entry
    )


def walked(table: SubscriptionTable, topic: str) -> list[tuple[str, str]]:
    """amqtt's way: every filter in the table, each judged by _matches."""
    return sorted(
        (topic_filter, s.client_id)
        for topic_filter, entry in dict.items(table)
        if amqtt_matches(topic, topic_filter)
        for s, _ in entry
    )


def test_literal_prefix_stops_at_the_first_wildcard() -> None:
    assert literal_prefix("fg/v1/dev/d1/cmd/#") == ("fg", "v1", "dev", "d1", "cmd")
    assert literal_prefix("fg/v1/enroll/+/req") == ("fg", "v1", "enroll")
    assert literal_prefix("#") == ()
    assert literal_prefix("/+") == ("",)


def test_exact_and_wildcard_filters_reach_what_amqtt_would_reach() -> None:
    table = SubscriptionTable()
    for n in range(500):
        subscribe(table, f"fg/v1/enroll/d{n}/resp", f"d{n}")
        subscribe(table, f"fg/v1/dev/d{n}/cmd/#", f"d{n}")
    subscribe(table, "fg/v1/enroll/+/req", "gateway")
    subscribe(table, "fg/v1/dev/+/renew/req", "gateway")
    subscribe(table, "fg/v1/dev/d7/cmd/open", "d7")  # overlaps d7's cmd/#
    subscribe(table, "#", "spy")
    subscribe(table, "+/+/+", "spy")

    assert reached(table, "fg/v1/enroll/d3/resp") == [
        ("#", "spy"),
        ("fg/v1/enroll/d3/resp", "d3"),
    ]
    assert reached(table, "fg/v1/enroll/d3/req") == [
        ("#", "spy"),
        ("fg/v1/enroll/+/req", "gateway"),
    ]
    assert reached(table, "fg/v1/dev/d7/cmd/open") == [
        ("#", "spy"),
        ("fg/v1/dev/d7/cmd/#", "d7"),
        ("fg/v1/dev/d7/cmd/open", "d7"),
    ]
    assert reached(table, "fg/v1/dev/d7/cmd") == [("#", "spy"), ("fg/v1/dev/d7/cmd/#", "d7")]
    assert reached(table, "fg/v1/pki") == [("#", "spy"), ("+/+/+", "spy")]
    # MQTT-4.7.2-1: a topic starting with $ is not matched by a filter starting with a wildcard
    assert reached(table, "$SYS/broker/load") == []


def test_random_filters_and_topics_route_exactly_as_amqtt_walks() -> None:
    rng = random.Random(20261204)
    levels = ["a", "b", "", "$x", "c"]
    table = SubscriptionTable()
    filters = set()
    for _ in range(400):
        size = rng.randint(1, 4)
        parts = [rng.choice([*levels, "+"]) for _ in range(size)]
        if rng.random() < 0.3:
            parts[-1] = "#"
        filters.add("/".join(parts))
    for index, topic_filter in enumerate(sorted(filters)):
        subscribe(table, topic_filter, f"c{index % 7}")
    for _ in range(300):
        topic = "/".join(rng.choice(levels) for _ in range(rng.randint(1, 5)))
        assert reached(table, topic) == walked(table, topic), topic


def test_unsubscribe_and_session_end_leave_no_trace() -> None:
    table = SubscriptionTable()
    subscribe(table, "fg/v1/dev/d1/cmd/#", "d1")
    subscribe(table, "fg/v1/dev/d1/renew/resp", "d1")
    subscribe(table, "fg/v1/dev/+/renew/req", "gateway")
    subscribe(table, "fg/v1/dev/+/renew/req", "d1")

    assert table.discard("fg/v1/dev/d1/cmd/#", "d1") == 1
    assert table.discard("fg/v1/dev/d1/cmd/#", "d1") == 0
    assert reached(table, "fg/v1/dev/d1/cmd/x") == []
    assert "fg/v1/dev/d1/cmd/#" not in table  # no empty filter left behind
    assert sorted(table.filters_of("d1")) == ["fg/v1/dev/+/renew/req", "fg/v1/dev/d1/renew/resp"]

    assert sorted(table.discard_client("d1")) == [
        "fg/v1/dev/+/renew/req",
        "fg/v1/dev/d1/renew/resp",
    ]
    assert table.filters_of("d1") == []
    assert dict(table) == {"fg/v1/dev/+/renew/req": [(Sub("gateway"), 1)]}
    assert reached(table, "fg/v1/dev/d1/renew/req") == [("fg/v1/dev/+/renew/req", "gateway")]
    table.pop("fg/v1/dev/+/renew/req")
    assert reached(table, "fg/v1/dev/d1/renew/req") == []
    assert table.filters_of("gateway") == []


def test_a_subscriber_added_during_delivery_does_not_change_that_delivery() -> None:
    table = SubscriptionTable()
    subscribe(table, "a/+", "c1")
    found = table.matching("a/b", amqtt_matches)
    subscribe(table, "a/+", "c2")  # arrives while the message is being delivered
    subscribe(table, "a/b", "c3")
    table.discard("a/+", "c1")
    assert [(f, [s.client_id for s, _ in entry]) for f, entry in found] == [("a/+", ["c1"])]
    assert reached(table, "a/b") == [("a/+", "c2"), ("a/b", "c3")]


def test_clear_forgets_every_index() -> None:
    table = SubscriptionTable()
    subscribe(table, "a/#", "c1")
    subscribe(table, "a/b", "c1")
    table.clear()
    assert reached(table, "a/b") == [] and table.filters_of("c1") == []
    with pytest.raises(TypeError):
        table.update({"x": []})


# -- the broker, with real TLS clients -------------------------------------------------------

DEVICES = [f"dev-{n:02d}" for n in range(24)]


@pytest.fixture
async def env(pki_env: Pki) -> AsyncIterator[Env]:
    environment = make_env(pki_env)
    environment.states.update({d: IdentityState.ACTIVE for d in DEVICES})
    await environment.broker.start()
    try:
        yield environment
    finally:
        await environment.broker.stop()


def table_of(env: Env) -> SubscriptionTable:
    broker = env.broker._broker
    assert broker is not None
    table = broker._subscriptions
    assert isinstance(table, SubscriptionTable)
    return table


@pytest.mark.broker
async def test_many_devices_each_get_only_their_own_messages(env: Env) -> None:
    async with connected(env, DEVICES) as clients:
        received: dict[str, list[str]] = {}
        async with collecting_each(clients, received):
            for device, client in clients.items():
                assert granted(await client.subscribe(f"fg/v1/dev/{device}/cmd/#", qos=1)) == [1]
                assert granted(await client.subscribe(f"fg/v1/dev/{device}/renew/resp", 1)) == [1]
            # overlapping filters of one device: one delivery per matching filter, as amqtt
            await clients["dev-03"].subscribe("fg/v1/dev/dev-03/cmd/open", qos=1)
            async with env.internal("gateway") as gateway, collecting(gateway) as seen:
                await gateway.subscribe("fg/v1/dev/+/telemetry", qos=1)
                await gateway.subscribe("fg/v1/dev/dev-05/telemetry", qos=1)
                for device in DEVICES:
                    await gateway.publish(f"fg/v1/dev/{device}/cmd/open", device.encode(), qos=1)
                    await gateway.publish(f"fg/v1/dev/{device}/renew/resp", b"r", qos=1)
                await clients["dev-05"].publish("fg/v1/dev/dev-05/telemetry", b"t", qos=1)
                await settle(0.5)
    assert seen == ["fg/v1/dev/dev-05/telemetry"] * 2
    for device in DEVICES:
        expected = [f"fg/v1/dev/{device}/cmd/open", f"fg/v1/dev/{device}/renew/resp"]
        if device == "dev-03":
            expected.insert(0, "fg/v1/dev/dev-03/cmd/open")
        assert received[device] == expected, device


@pytest.mark.broker
async def test_unsubscribe_and_session_end_empty_the_table(env: Env) -> None:
    before = dict(table_of(env))
    async with connected(env, DEVICES[:6]) as clients:
        for device, client in clients.items():
            await client.subscribe(f"fg/v1/dev/{device}/cmd/#", qos=1)
            await client.subscribe(f"fg/v1/dev/{device}/renew/resp", qos=1)
        assert len(table_of(env)) == len(before) + 12
        received: dict[str, list[str]] = {}
        async with collecting_each(clients, received):
            await clients["dev-00"].unsubscribe("fg/v1/dev/dev-00/cmd/#")
            async with env.internal("gateway") as gateway:
                await gateway.publish("fg/v1/dev/dev-00/cmd/open", b"x", qos=1)
                await gateway.publish("fg/v1/dev/dev-01/cmd/open", b"x", qos=1)
                await settle()
        assert received["dev-00"] == []
        assert received["dev-01"] == ["fg/v1/dev/dev-01/cmd/open"]
        assert table_of(env).filters_of("dev-00") == ["fg/v1/dev/dev-00/renew/resp"]
    for _ in range(100):
        if dict(table_of(env)) == before:
            break
        await asyncio.sleep(0.02)
    assert dict(table_of(env)) == before
    assert all(table_of(env).filters_of(d) == [] for d in DEVICES)


@pytest.mark.broker
async def test_a_persistent_session_gets_queued_and_retained_messages_on_return(
    env: Env,
) -> None:
    device = "dev-01"

    def persistent() -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            env.ports["operational"],
            identifier=device,
            tls_context=env.pki.client_context(env.pki.credential(device)),
            clean_session=False,
            timeout=5,
        )

    async with env.internal("gateway") as gateway:
        await gateway.publish("fg/v1/pki/crl", b"crl", qos=1, retain=True)
        await gateway.publish("fg/v1/dev/dev-01/state", b"not subscribed", qos=1, retain=True)
    async with persistent() as client, collecting(client) as first:
        await client.subscribe(f"fg/v1/dev/{device}/cmd/#", qos=1)
        await client.subscribe("fg/v1/pki/crl", qos=1)
        await settle()
    async with env.internal("gateway") as gateway:
        await gateway.publish(f"fg/v1/dev/{device}/cmd/open", b"while away", qos=1)
        await gateway.publish("fg/v1/dev/dev-02/cmd/open", b"not yours", qos=1)
        await settle()
    async with persistent() as client, collecting(client) as received:
        await settle(0.5)
    assert first == ["fg/v1/pki/crl"]
    # the queued command, and the retained message of each of its own filters again
    assert sorted(received) == ["fg/v1/dev/dev-01/cmd/open", "fg/v1/pki/crl"]


# -- helpers for many clients -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(env: Env, devices: list[str]) -> AsyncIterator[dict[str, aiomqtt.Client]]:
    """``devices`` connected at once, each over mutual TLS with its own certificate."""
    clients = {d: env.device(d) for d in devices}
    await asyncio.gather(*(c.__aenter__() for c in clients.values()))
    try:
        yield clients
    finally:
        await asyncio.gather(
            *(c.__aexit__(None, None, None) for c in clients.values()), return_exceptions=True
        )


@contextlib.asynccontextmanager
async def collecting_each(
    clients: dict[str, aiomqtt.Client], into: dict[str, list[str]]
) -> AsyncIterator[None]:
    async def run(client: aiomqtt.Client, received: list[str]) -> None:
        async for message in client.messages:
            received.append(str(message.topic))

    tasks = []
    for device, client in clients.items():
        into[device] = []
        tasks.append(asyncio.create_task(run(client, into[device])))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_the_table_describes_itself_in_constant_size_whatever_the_fleet() -> None:
    # amqtt logs repr() of the table on every SUBSCRIBE, at any log level: a repr that grew
    # with the fleet made onboarding quadratic.
    small, large = SubscriptionTable(), SubscriptionTable()
    small["fg/v1/dev/a/cmd/#"] = []
    for n in range(2000):
        large[f"fg/v1/dev/d{n}/cmd/#"] = []
    assert len(repr(large)) <= len(repr(small)) + 4
    assert "2000 filters" in repr(large)
