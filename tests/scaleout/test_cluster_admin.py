"""The admin API on a gateway of a cluster: a change asked of a gateway that does not lead is
recorded, enforced by the leader and answered once in force; with no leader the operator gets
the typed reason ``not_enforced_yet`` (not an internal error), and the next leader enforces
what was recorded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from scaleout_kit import cluster_home, device, enroll, eventually, operational

from gateway.admin import attach_admin
from gateway.admin.wire import encode_request
from gateway.cluster import ClusterMember, PostgresLeaderLock
from gateway.cluster.keeper import BrokerKeeper
from gateway.config import Settings
from gateway.service import Gateway
from gateway.store import IdentityRecord, IdentityState
from pki.profile import IdentityKind
from simulators.factory import trust_factory

pytestmark = [pytest.mark.slow, pytest.mark.broker]

ENFORCE_TIMEOUT = 2.0


class Site:
    def __init__(self, settings: Settings, keeper: BrokerKeeper) -> None:
        self.settings = settings
        self.keeper = keeper
        self.gateways: list[Gateway] = []
        self.ca_pem = (settings.ca_dir / "root.crt").read_bytes()

    async def add(self, node: str) -> Gateway:
        member = ClusterMember(
            self.settings, node=node, interval=0.2, enforce_timeout=ENFORCE_TIMEOUT
        )
        gateway = Gateway(self.settings, cluster=member)
        self.gateways.append(gateway)
        await gateway.start()
        return gateway

    async def connected_device(self, gateway: Gateway, serial: str) -> tuple[str, Any]:
        shared = self.keeper.shared
        assert shared is not None
        client = device(trust_factory(self.settings), serial)
        enrolled = await enroll(client, shared.host, shared.enrollment_port, self.ca_pem)
        session = await operational(
            enrolled, client.device_id, shared.host, shared.operational_port, self.ca_pem
        )
        return client.device_id, session


@pytest.fixture
async def site(tmp_path: Path, database_url: str, mosquitto: None) -> AsyncIterator[Site]:
    settings = cluster_home(tmp_path / "home", database_url)
    keeper = BrokerKeeper(settings)
    await keeper.start()
    group = Site(settings, keeper)
    try:
        yield group
    finally:
        for gateway in group.gateways:
            await gateway.stop()
        await group.keeper.stop()


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


async def test_a_follower_answers_once_the_leader_enforced_the_change(site: Site) -> None:
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


async def test_without_a_leader_the_operator_hears_not_enforced_yet(site: Site) -> None:
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
