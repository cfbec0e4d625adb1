"""The small parts of a cluster, each with the mistakes it must refuse: the shared broker's
descriptor, the enforcement announcements, shared subscriptions, batched admissions, who the
leader must not re-admit, and the command line."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.acl import Principal
from gateway.cli import app
from gateway.cluster import (
    ENFORCED_TOPIC,
    ClusterError,
    ClusterMember,
    ClusterReason,
    EnforcementWatch,
    MemoryLocks,
    SharedBroker,
    announcement,
    descriptor_path,
    load_shared_broker,
    parse_announcement,
    save_shared_broker,
)
from gateway.cluster.sessions import (
    SESSIONS_ASK_TOPIC,
    SessionsAsker,
    answer,
    answer_topic,
    parse_answer,
    parse_question,
    question,
)
from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway, IdentityStates
from gateway.store import IdentityRecord, IdentityState
from gateway.store_memory import MemoryStore
from gateway.transport import BrokerAddress, Outgoing, Route
from pki.clock import SystemClock
from pki.profile import IdentityKind

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def shared(**changes: object) -> SharedBroker:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "enrollment_port": 18883,
        "operational_port": 18884,
        "internal_port": 18885,
        "admin_password": "secret",
    }
    values.update(changes)
    return SharedBroker(**values)  # type: ignore[arg-type]


# -- the descriptor ----------------------------------------------------------------------------


def test_the_descriptor_round_trips_and_only_its_owner_can_read_it(tmp_path: Path) -> None:
    written = save_shared_broker(tmp_path, shared())
    assert written == descriptor_path(tmp_path)
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600  # it holds the admin password
    assert load_shared_broker(tmp_path) == shared()
    assert "secret" not in repr(shared())


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"enrollment_port": 0}, ValueError),
        ({"operational_port": 70000}, ValueError),
        ({"internal_port": "18885"}, TypeError),
        ({"internal_port": True}, TypeError),
        ({"operational_port": 18883}, ValueError),  # two listeners on one port
        ({"host": ""}, ValueError),
        ({"admin_password": None}, TypeError),
        ({"admin_username": "device-1"}, ValueError),  # a certificate CN could claim it
    ],
)
def test_a_descriptor_with_a_bad_value_is_refused(
    changes: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        shared(**changes)


def test_a_missing_descriptor_says_to_start_the_broker_first(tmp_path: Path) -> None:
    with pytest.raises(ClusterError) as caught:
        load_shared_broker(tmp_path)
    assert caught.value.reason is ClusterReason.NO_SHARED_BROKER
    assert "start the shared broker" in caught.value.detail


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"format": 2}),
        json.dumps({**shared().to_json(), "surprise": 1}),
        json.dumps({**shared().to_json(), "internal_port": -1}),
        json.dumps({k: v for k, v in shared().to_json().items() if k != "host"}),
    ],
)
def test_a_damaged_descriptor_is_a_typed_error(tmp_path: Path, content: str) -> None:
    path = descriptor_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ClusterError) as caught:
        load_shared_broker(tmp_path)
    assert caught.value.reason is ClusterReason.BAD_SHARED_BROKER


# -- enforcement announcements -----------------------------------------------------------------


def test_an_announcement_is_retained_and_names_the_sequence_number() -> None:
    message = announcement(42, "gw-1")
    assert message.topic == ENFORCED_TOPIC and message.retain and message.qos == 1
    assert parse_announcement(message.payload) == 42
    with pytest.raises(ValueError):
        announcement(-1, "gw-1")


@pytest.mark.parametrize(
    "payload",
    [b"", b"42", b"{}", b'{"seq": -1}', b'{"seq": true}', b'{"seq": "7"}', b"x" * 2000],
)
def test_an_unreadable_announcement_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_announcement(payload)


async def test_a_waiter_goes_on_once_the_leader_announced_its_change() -> None:
    watch = EnforcementWatch()
    waiter = asyncio.create_task(watch.wait(5, timeout=2))
    await asyncio.sleep(0.01)
    watch.handle(ENFORCED_TOPIC, announcement(4, "gw").payload)
    await asyncio.sleep(0.01)
    assert not waiter.done()  # 4 does not cover 5
    watch.handle(ENFORCED_TOPIC, announcement(6, "gw").payload)
    assert await waiter is True
    assert await watch.wait(3, timeout=0.01) is True  # long done


async def test_announcements_only_move_forward_and_garbage_is_ignored() -> None:
    watch = EnforcementWatch()
    watch.note(10)
    watch.handle(ENFORCED_TOPIC, announcement(3, "deposed-leader").payload)
    watch.handle(ENFORCED_TOPIC, b"not json")
    assert watch.seq == 10
    assert await watch.wait(11, timeout=0.05) is False


# -- who is connected, asked of the leader ----------------------------------------------------


def test_a_question_and_its_answer_round_trip() -> None:
    ask = question("gw-2", "q1")
    assert ask.topic == SESSIONS_ASK_TOPIC and ask.qos == 1 and not ask.retain
    assert parse_question(ask.payload) == ("gw-2", "q1")
    sessions = {"th-0001": Principal("device", "th-0001", "operational")}
    reply = answer("gw-2", "q1", sessions)
    assert reply.topic == answer_topic("gw-2")
    assert parse_answer(reply.payload) == ("q1", sessions)


@pytest.mark.parametrize(
    "payload",
    [b"", b"[]", b"{}", b'{"from": "gw/2", "id": "q"}', b'{"from": "gw-2"}',
     b'{"from": "gw-2", "id": ""}', b'{"from": 7, "id": "q"}', b"x" * 1000, b"[" * 500],
)
def test_a_malformed_question_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_question(payload)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{}", b'{"id": "q", "sessions": {}}', b'{"id": "q", "sessions": [["a"]]}',
     b'{"id": "q", "sessions": [["a", "robot", "a", "operational"]]}',
     b'{"id": "q", "sessions": [["a", "device", "no spaces", "operational"]]}',
     b'{"sessions": []}', b"[" * 100_000],
)
def test_a_malformed_answer_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(payload)


async def test_the_asker_takes_its_answer_and_counts_what_else_comes() -> None:
    asker = SessionsAsker("gw-2", timeout=2)
    asked: list[bytes] = []

    async def publish(message: Outgoing) -> None:
        asked.append(message.payload)

    waiting = asyncio.create_task(asker.ask(publish))
    await asyncio.sleep(0.01)
    _, ask_id = parse_question(asked[0])
    sessions = {"th-1": Principal("device", "th-1", "operational")}
    asker.handle_answer(asker.topic, b"garbage")
    asker.handle_answer(asker.topic, answer("gw-2", "someone-elses", {}).payload)
    assert not waiting.done()
    asker.handle_answer(asker.topic, answer("gw-2", ask_id, sessions).payload)
    assert await waiting == sessions
    asker.handle_answer(asker.topic, answer("gw-2", ask_id, sessions).payload)  # too late
    assert asker.metrics == {"asked": 1, "answered": 1, "bad_answer": 1, "late_answer": 2}


async def test_no_answer_in_time_means_no_leader() -> None:
    asker = SessionsAsker("gw-2", timeout=0.05)

    async def nobody_listens(message: Outgoing) -> None:
        pass

    with pytest.raises(ClusterError) as caught:
        await asker.ask(nobody_listens)
    assert caught.value.reason is ClusterReason.NO_LEADER
    assert asker.metrics["unanswered"] == 1
    with pytest.raises(ValueError):
        SessionsAsker("gw-2", timeout=0)


# -- shared subscriptions ----------------------------------------------------------------------


def _noop(topic: str, payload: bytes) -> list[object]:
    return []


def test_shared_routes_are_subscribed_through_the_share_group() -> None:
    shared_route = Route("fg/v1/enroll/+/req", _noop, shared=True)  # type: ignore[arg-type]
    plain_route = Route("fg/v1/cluster/enforced", _noop)  # type: ignore[arg-type]
    grouped = BrokerAddress("127.0.0.1", 1883, share_group="fleetgate", mqtt5=True)
    assert grouped.subscription(shared_route) == "$share/fleetgate/fg/v1/enroll/+/req"
    assert grouped.subscription(plain_route) == "fg/v1/cluster/enforced"
    alone = BrokerAddress("127.0.0.1", 1883)
    assert alone.subscription(shared_route) == "fg/v1/enroll/+/req"


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#", "a\x00"])
def test_a_share_group_that_would_change_the_filter_is_refused(group: str) -> None:
    with pytest.raises(ValueError, match="share_group"):
        BrokerAddress("127.0.0.1", 1883, share_group=group)


# -- what the leader leaves to the certifying gateway -----------------------------------------


def _identity(name: str, kind: IdentityKind, state: IdentityState) -> IdentityRecord:
    return IdentityRecord(id=name, kind=kind, state=state, created_at=NOW, updated_at=NOW)


def test_the_leader_leaves_new_active_devices_to_the_gateway_that_certified_them() -> None:
    store = MemoryStore()
    states = IdentityStates(store)
    store.put_identity(_identity("known", IdentityKind.DEVICE, IdentityState.ACTIVE))
    states.refresh()
    store.change_state("known", IdentityState.QUARANTINED, NOW)
    store.put_identity(_identity("enrolled", IdentityKind.DEVICE, IdentityState.ACTIVE))
    store.put_identity(_identity("waiting", IdentityKind.DEVICE, IdentityState.PENDING))
    store.put_identity(_identity("alice", IdentityKind.OPERATOR, IdentityState.ACTIVE))
    changed = states.refresh(new_active_devices=False)
    # a state change, a device nobody admitted, an operator made by the CLI: the leader's
    assert set(changed) == {"known", "waiting", "alice"}
    assert states("enrolled") is IdentityState.ACTIVE  # still known to the ACL


# -- membership and the command line -----------------------------------------------------------


def test_a_member_needs_a_postgresql_registry_and_the_shared_broker(tmp_path: Path) -> None:
    init_home(tmp_path)
    settings = load_settings(tmp_path)  # SQLite
    with pytest.raises(ClusterError) as caught:
        ClusterMember(settings, shared=shared())
    assert caught.value.reason is ClusterReason.NEEDS_POSTGRESQL
    with pytest.raises(ClusterError) as caught:
        ClusterMember(settings, lock=MemoryLocks().session())
    assert caught.value.reason is ClusterReason.NO_SHARED_BROKER


@pytest.mark.parametrize("node", ["", "-x", "a b", "x" * 64, "é"])
def test_a_node_name_that_cannot_name_a_client_is_refused(tmp_path: Path, node: str) -> None:
    init_home(tmp_path)
    with pytest.raises(ValueError, match="node name"):
        ClusterMember(
            load_settings(tmp_path), node=node, lock=MemoryLocks().session(), shared=shared()
        )


def test_a_member_has_its_own_client_id_and_account(tmp_path: Path) -> None:
    init_home(tmp_path)
    member = ClusterMember(
        load_settings(tmp_path), node="gw-2", lock=MemoryLocks().session(), shared=shared()
    )
    assert member.client_id == "fleetgate-gw-2" and member.account == "_fg_gw-gw-2"
    assert not member.is_leader


def test_a_cluster_gateway_needs_mosquitto(tmp_path: Path) -> None:
    init_home(tmp_path)
    settings = load_settings(tmp_path)
    member = ClusterMember(settings, lock=MemoryLocks().session(), shared=shared())
    with pytest.raises(ClusterError) as caught:
        Gateway(settings, store=MemoryStore(), broker_kind="embedded", cluster=member)
    assert caught.value.reason is ClusterReason.NEEDS_MOSQUITTO


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "--broker", "embedded"], "needs --broker mosquitto"),
        (["--node", "gw-1"], "add --cluster"),
        (["--cluster"], "cluster_needs_postgresql"),
        (["--cluster", "--database", "postgresql://u@127.0.0.1:1/db"], "no_shared_broker"),
        (["--database", " "], "must not be empty"),
    ],
)
def test_run_refuses_a_cluster_it_cannot_be_part_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    # --database sets it in this process: monkeypatch restores it as it was before the test
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", "")
    monkeypatch.delenv("FLEETGATE_DATABASE_URL")
    init_home(tmp_path)
    result = CliRunner().invoke(app, ["run", "--home", str(tmp_path), *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())


async def test_the_leader_alone_answers_and_drops_a_malformed_question(tmp_path: Path) -> None:
    init_home(tmp_path)
    settings = load_settings(tmp_path)
    locks = MemoryLocks()

    async def nothing() -> None:
        pass

    members = []
    for node in ("gw-1", "gw-2"):
        member = ClusterMember(settings, node=node, lock=locks.session(), shared=shared())
        control = member.broker(clock=SystemClock(), on_clone=None)
        assert not control.follows_sessions  # until elected
        await member.start(on_elected=nothing, on_deposed=nothing)
        members.append((member, control))
    try:
        (leader, leader_control), (follower, follower_control) = members
        assert leader.is_leader and leader_control.follows_sessions
        assert not follower.is_leader and not follower_control.follows_sessions
        [route] = [r for r in leader.routes() if r.topic_filter == SESSIONS_ASK_TOPIC]
        ask = question("gw-2", "q1")
        [reply] = route.handler(ask.topic, ask.payload)
        assert reply.topic == answer_topic("gw-2")
        assert parse_answer(reply.payload) == ("q1", {})
        assert route.handler(ask.topic, b"{not json") == []
        assert leader.metrics["bad_question"] == 1
        [follower_route] = [r for r in follower.routes() if r.topic_filter == SESSIONS_ASK_TOPIC]
        assert follower_route.handler(ask.topic, ask.payload) == []  # not the leader's job
    finally:
        for member, _ in members:
            await member.stop()
