"""Two gateways of one cluster in this process, the shared broker's keeper beside them, one
PostgreSQL: each request is answered once, a revocation through either gateway cuts the device
(enforced once, by the leader), and when the leader stops the other gateway leads."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509
from scaleout_kit import Cluster, device, enroll, eventually, operational, refused

from gateway import operations
from gateway.cluster import ClusterError, ClusterReason, PostgresLeaderLock
from gateway.cluster.keeper import BrokerKeeper
from gateway.store import IdentityState
from simulators.factory import trust_factory

pytestmark = [pytest.mark.slow, pytest.mark.broker]


async def test_two_gateways_share_the_requests_and_either_can_revoke(cluster: Cluster) -> None:
    leader = await cluster.add("gw-1")
    follower = await cluster.add("gw-2")
    assert leader.cluster is not None and follower.cluster is not None
    assert leader.cluster.is_leader and not follower.cluster.is_leader
    shared, ca = cluster.shared, cluster.ca_pem
    factory = trust_factory(cluster.settings)

    clients = [device(factory, f"th-{n:04d}") for n in range(1, 7)]
    enrolled = await asyncio.gather(
        *(enroll(c, shared.host, shared.enrollment_port, ca) for c in clients)
    )
    challenges = [g.enrollment.metrics["challenges"] for g in (leader, follower)]
    assert sum(challenges) == len(clients)  # each hello answered once, not once per gateway
    assert all(challenges), challenges  # and the broker spread them over both

    sessions = [
        await operational(e, c.device_id, shared.host, shared.operational_port, ca)
        for c, e in zip(clients, enrolled, strict=True)
    ]

    # Through the follower: it records the change, the leader enforces it, and the call
    # returns once the leader says it did.
    await follower.revoke(clients[0].device_id, actor="ops", reason="stolen")
    await asyncio.wait_for(asyncio.shield(sessions[0].ended), 1.0)
    # Through the leader: enforced by itself, at once.
    await leader.revoke(clients[1].device_id, actor="ops", reason="stolen")
    await asyncio.wait_for(asyncio.shield(sessions[1].ended), 1.0)
    for index in (0, 1):
        await eventually(
            lambda i=index: refused(
                enrolled[i], clients[i].device_id, shared.host, shared.operational_port, ca
            ),
            5, "a revoked certificate refused",
        )
    # The others kept their sessions.
    assert not any(s.ended.done() for s in sessions[2:])

    # The leader goes away; the follower takes over and enforces on its own.
    await leader.stop()
    cluster.gateways.remove(leader)
    await eventually(lambda: follower.cluster.is_leader, 3, "the follower leads")
    await follower.quarantine(clients[2].device_id, actor="ops", reason="odd traffic")
    await follower.revoke(clients[3].device_id, actor="ops", reason="decommissioned")
    await asyncio.wait_for(asyncio.shield(sessions[3].ended), 1.0)
    assert not sessions[2].ended.done()  # quarantined devices stay connected
    late = device(factory, "th-0099")
    await enroll(late, shared.host, shared.enrollment_port, ca)

    # The broker refuses exactly the revoked certificates: the keeper installed the CRL the
    # leaders published.
    crl_path = cluster.keeper.broker.run_dir / "crl.pem"
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    revoked = {entry.serial_number for entry in crl}
    assert revoked == {enrolled[i].certificate.serial_number for i in (0, 1, 3)}
    for session in sessions:
        await session.close()


async def test_without_a_leader_a_change_is_recorded_and_enforced_by_the_next_one(
    cluster: Cluster,
) -> None:
    # Someone holds the leader lock and enforces nothing (a wedged leader).
    wedged = PostgresLeaderLock(cluster.settings.database)
    assert wedged.try_acquire()
    try:
        gateway = await cluster.add("gw-1")
        assert gateway.cluster is not None and not gateway.cluster.is_leader
        shared, ca = cluster.shared, cluster.ca_pem
        client = device(trust_factory(cluster.settings), "th-0001")
        enrolled = await enroll(client, shared.host, shared.enrollment_port, ca)
        session = await operational(
            enrolled, client.device_id, shared.host, shared.operational_port, ca
        )
        with pytest.raises(ClusterError) as caught:
            await gateway.revoke(client.device_id, actor="ops", reason="test")
        assert caught.value.reason is ClusterReason.NOT_ENFORCED
        assert not session.ended.done()
    finally:
        wedged.close()
    # The lock is free: the gateway leads, and its takeover enforces what was recorded.
    await eventually(lambda: gateway.cluster.is_leader, 3, "the gateway leads")
    await asyncio.wait_for(asyncio.shield(session.ended), 2.0)
    await session.close()


async def test_a_change_the_dying_leader_did_not_enforce_is_enforced_by_the_next(
    cluster: Cluster,
) -> None:
    leader = await cluster.add("gw-1")
    follower = await cluster.add("gw-2")
    assert leader.cluster is not None and follower.cluster is not None
    shared, ca = cluster.shared, cluster.ca_pem
    factory = trust_factory(cluster.settings)
    clients = [device(factory, f"th-{n:04d}") for n in (1, 2)]
    enrolled = [await enroll(c, shared.host, shared.enrollment_port, ca) for c in clients]
    sessions = [
        await operational(e, c.device_id, shared.host, shared.operational_port, ca)
        for c, e in zip(clients, enrolled, strict=True)
    ]
    await eventually(lambda: follower.cluster.watch.seq >= 2, 3, "the enrollments announced")

    # From here the leader reaches neither the broker nor the other gateways: it sees the
    # operator's revocation in the registry but cannot enforce or announce it, then dies.
    async def unreachable(*_args: object, **_kwargs: object) -> None:
        return None

    leader.broker.apply = unreachable  # type: ignore[method-assign, union-attr]
    leader.cluster.announce = unreachable  # type: ignore[method-assign]
    operations.change_state(
        leader.store, clients[0].device_id, IdentityState.REVOKED, action="revoke",
        actor="cli:ops", reason="stolen",
    )
    await asyncio.sleep(0.6)  # the leader polled and "enforced" it
    assert not sessions[0].ended.done()
    await leader.stop()
    cluster.gateways.remove(leader)

    # The new leader re-enforces only what came after the last announcement, and that
    # includes the revocation.
    await eventually(lambda: follower.cluster.is_leader, 3, "the follower leads")
    await asyncio.wait_for(asyncio.shield(sessions[0].ended), 2.0)
    assert not sessions[1].ended.done()
    for session in sessions:
        await session.close()


async def test_the_gateways_carry_on_after_the_broker_keeper_restarts(cluster: Cluster) -> None:
    gateway = await cluster.add("gw-1")
    shared, ca = cluster.shared, cluster.ca_pem
    factory = trust_factory(cluster.settings)
    await enroll(device(factory, "th-0001"), shared.host, shared.enrollment_port, ca)

    # The broker comes back from the registry, without the gateway's own account: the gateway
    # puts it back and its message client reconnects.
    await cluster.keeper.stop()
    cluster.keeper = BrokerKeeper(cluster.settings)
    assert await cluster.keeper.start() == shared  # same ports, same admin account
    late = device(factory, "th-0002")
    enrolled = await enroll(late, shared.host, shared.enrollment_port, ca, timeout=30)
    session = await operational(
        enrolled, late.device_id, shared.host, shared.operational_port, ca
    )
    await gateway.revoke(late.device_id, actor="ops", reason="test")
    await asyncio.wait_for(asyncio.shield(session.ended), 2.0)
    await session.close()
