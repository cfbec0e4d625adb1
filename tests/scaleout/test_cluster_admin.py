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
