"""The admin API on a gateway of a cluster: a change asked of a gateway that does not lead is
recorded, enforced by the leader and answered once in force; with no leader the operator gets
the typed reason ``not_enforced_yet`` (not an internal error), and the next leader enforces
what was recorded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from scaleout_kit import Cluster, eventually

from gateway.admin import attach_admin
from gateway.admin.wire import encode_request
from gateway.cluster import PostgresLeaderLock
from gateway.service import Gateway
from gateway.store import IdentityRecord, IdentityState
from pki.profile import IdentityKind

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ENFORCE_TIMEOUT = 2.0


@pytest.fixture
def site(cluster: Cluster) -> Cluster:
    cluster.enforce_timeout = ENFORCE_TIMEOUT
    return cluster


def add_admin(gateway: Gateway, name: str = "ada") -> None:
    now = gateway.clock.now()
    gateway.store.put_identity(
        IdentityRecord(name, IdentityKind.OPERATOR, IdentityState.ACTIVE, now, now, role="admin")
    )


async def ask(gateway: Gateway, op: str, args: dict[str, Any], operator: str = "ada") -> Any:
    """One admin request through the gateway's own admin service, from a worker thread as
    the admin API serves it (its backend waits on the gateway's loop)."""
    service = attach_admin(gateway)  # the service the gateway attached at construction
    payload = encode_request("req-1", op, args)
    [reply] = await asyncio.to_thread(service.handle, f"fg/v1/admin/{operator}/req", payload)
    return json.loads(reply.payload)


async def test_a_follower_answers_once_the_leader_enforced_the_change(site: Cluster) -> None:
    leader = await site.add("gw-1")
    follower = await site.add("gw-2")
    assert leader.cluster is not None and leader.cluster.is_leader
    assert follower.cluster is not None and not follower.cluster.is_leader
    add_admin(follower)
    device_id, session = await site.connected_device(follower, "th-0001")

    body = await ask(follower, "revoke", {"ids": [device_id], "reason": "stolen"})
    assert body["ok"] is True, body
    assert body["result"]["results"] == [{"id": device_id, "ok": True, "state": "revoked"}]
    # in force when the reply came: the leader cut the session
    await asyncio.wait_for(asyncio.shield(session.ended), 1.0)
    await session.close()


async def test_without_a_leader_the_operator_hears_not_enforced_yet(site: Cluster) -> None:
    wedged = PostgresLeaderLock(site.settings.database)  # holds the lock, enforces nothing
    assert wedged.try_acquire()
    try:
        gateway = await site.add("gw-1")
        assert gateway.cluster is not None and not gateway.cluster.is_leader
        add_admin(gateway)
        device_id, session = await site.connected_device(gateway, "th-0001")

        body = await ask(gateway, "revoke", {"ids": [device_id], "reason": "stolen"})
        assert body["ok"] is True, body  # a bulk reply: each device says how it went
        [item] = body["result"]["results"]
        assert item["ok"] is False
        assert item["error"]["reason"] == "not_enforced_yet"
        record = gateway.store.get_identity(device_id)
        assert record is not None and record.state is IdentityState.REVOKED  # recorded
        assert not session.ended.done()  # but not in force: nobody leads

        add_admin(gateway, "otto")
        operator_body = await ask(gateway, "revoke_operator", {"name": "otto", "reason": "x"})
        assert operator_body["ok"] is False
        assert operator_body["error"]["reason"] == "not_enforced_yet"
        assert attach_admin(gateway).metrics["rejected.internal"] == 0
    finally:
        wedged.close()
    # The lock is free: the gateway leads, and its takeover enforces what was recorded.
    await eventually(lambda: gateway.cluster.is_leader, 3, "the gateway leads")
    await asyncio.wait_for(asyncio.shield(session.ended), 2.0)
    await session.close()


def _follows(gateway: Gateway) -> bool:
    broker = gateway.broker
    assert broker is not None
    return bool(broker.follows_sessions)  # type: ignore[attr-defined]


async def test_only_the_leader_reads_connections_and_a_follower_asks_it(site: Cluster) -> None:
    leader = await site.add("gw-1")
    follower = await site.add("gw-2")
    assert _follows(leader) and not _follows(follower)
    add_admin(follower)
    device_id, session = await site.connected_device(follower, "th-0001")
    await eventually(lambda: device_id in leader.broker.connected(), 3, "the leader sees it")
    assert follower.broker.connected() == {}  # reads no notices of its own

    detail = await ask(follower, "get_identity", {"id": device_id})
    assert detail["ok"] is True, detail
    assert detail["result"]["connected"] is True  # the leader's answer
    fleet = await ask(follower, "list_identities", {"kind": "device"})
    assert [row["connected"] for row in fleet["result"]["identities"]] == [True]

    await session.close()

    async def gone() -> bool:
        body = await ask(follower, "get_identity", {"id": device_id})
        return body["result"]["connected"] is False

    await eventually(gone, 3, "the follower reports the session ended")
    assert follower.cluster is not None and follower.cluster.asked["answered"] >= 3


async def test_without_a_leader_who_is_connected_is_unavailable_not_a_guess(
    site: Cluster,
) -> None:
    wedged = PostgresLeaderLock(site.settings.database)
    assert wedged.try_acquire()
    try:
        gateway = await site.add("gw-1")
        add_admin(gateway)
        device_id, session = await site.connected_device(gateway, "th-0001")
        body = await ask(gateway, "get_identity", {"id": device_id})
        assert body["ok"] is False
        assert body["error"]["reason"] == "unavailable"
        assert "no leader" in body["error"]["detail"]
        assert gateway.cluster is not None and gateway.cluster.asked["unanswered"] == 1
        assert attach_admin(gateway).metrics["rejected.internal"] == 0
        await session.close()
    finally:
        wedged.close()


async def test_a_new_leader_reads_connections_from_its_election_on(site: Cluster) -> None:
    first = await site.add("gw-1")
    second = await site.add("gw-2")
    assert not _follows(second)
    await first.stop()  # hands the lead over at once
    await eventually(lambda: second.cluster.is_leader, 3, "the second gateway leads")
    assert _follows(second)
    device_id, session = await site.connected_device(second, "th-0002")
    await eventually(lambda: device_id in second.broker.connected(), 3, "it sees new sessions")
    await session.close()
    await eventually(lambda: device_id not in second.broker.connected(), 3, "and their end")


async def test_only_the_leader_receives_the_fleets_messages(site: Cluster) -> None:
    """The behaviour watch's subscription (state and quarantine topics; telemetry too, which
    every gateway's admin API counts for its own answers) is the leader's alone."""
    first = await site.add("gw-1")
    second = await site.add("gw-2")
    assert first.transport is not None and second.transport is not None
    device_id, session = await site.connected_device(first, "th-0003")
    state = "fg/v1/dev/+/state"

    async def publish(count: int) -> None:
        for n in range(count):
            await session.client.publish(f"fg/v1/dev/{device_id}/state", b"%d" % n, qos=1)

    await publish(5)
    await eventually(
        lambda: first.transport.received[state] == 5, 3, "the leader takes each message"
    )
    await asyncio.sleep(0.3)
    assert second.transport.received[state] == 0  # a follower is not sent them at all
    await first.stop()  # the lead passes to the second gateway, and the messages with it
    await eventually(lambda: second.cluster.is_leader, 3, "the second gateway leads")
    await publish(3)
    await eventually(
        lambda: second.transport.received[state] == 3, 3, "the new leader takes them"
    )
    await session.close()


async def test_the_leader_alone_tells_operators_who_connected(site: Cluster) -> None:
    leader = await site.add("gw-1")
    follower = await site.add("gw-2")
    heard: dict[str, list[tuple[str, str | None]]] = {"gw-1": [], "gw-2": []}
    leader.listeners.append(lambda event: heard["gw-1"].append((event.kind, event.subject)))
    follower.listeners.append(lambda event: heard["gw-2"].append((event.kind, event.subject)))
    device_id, session = await site.connected_device(follower, "th-0004")
    await eventually(
        lambda: ("connected", device_id) in heard["gw-1"], 3, "the leader's connected event"
    )
    await session.close()
    await eventually(
        lambda: ("disconnected", device_id) in heard["gw-1"], 3, "and its disconnected event"
    )
    assert not [e for e in heard["gw-2"] if e[0] in ("connected", "disconnected")]
