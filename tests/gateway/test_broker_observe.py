"""What the embedded broker reports to its observer, with real TLS clients on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from test_broker_embedded import (  # the broker test kit: PKI, clients, spy
    Env,
    Pki,
    _abrupt_device,
    collecting,
    connect_packet,
    granted,
    make_env,
    pki_env,
    settle,
    spying,
)

from gateway.acl import Action
from gateway.observe import Connected, Denied, Disconnected, Observation, Published
from gateway.store import IdentityState
from pki.profile import IdentityKind

pytestmark = pytest.mark.broker
__all__ = ["pki_env"]  # a fixture, imported for the tests below


@pytest.fixture
async def observed(pki_env: Pki) -> AsyncIterator[tuple[Env, list[Observation]]]:
    seen: list[Observation] = []
    environment = make_env(pki_env, observer=seen.append)
    await environment.broker.start()
    try:
        yield environment, seen
    finally:
        await environment.broker.stop()


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.01)


async def test_a_devices_session_is_reported_from_admission_to_end(
    observed: tuple[Env, list[Observation]],
) -> None:
    env, seen = observed
    env.states["dev-a"] = IdentityState.ACTIVE
    async with spying(env) as spy, env.device("dev-a") as a, collecting(a) as received:
        assert granted(await a.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)) == [1]
        assert granted(await a.subscribe("fg/v1/dev/dev-b/cmd/#", qos=1)) == [128]
        await a.publish("fg/v1/dev/dev-a/telemetry", b"21.5", qos=1)
        await a.publish("fg/v1/dev/dev-b/telemetry", b"forged", qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/telemetry")
        env.states["dev-a"] = IdentityState.QUARANTINED
        async with env.internal("gateway") as gateway:
            await gateway.publish("fg/v1/dev/dev-a/cmd/open", b"not now", qos=1)
        await settle()
        remote = next(o.remote for o in seen if isinstance(o, Connected))
    await wait_until(lambda: any(isinstance(o, Disconnected) for o in seen))
    assert received == []
    assert seen == [
        Connected("dev-a", remote),
        Denied("dev-a", Action.SUBSCRIBE, "fg/v1/dev/dev-b/cmd/#"),
        Published("dev-a", "fg/v1/dev/dev-a/telemetry", 4),
        Denied("dev-a", Action.PUBLISH, "fg/v1/dev/dev-b/telemetry"),
        Denied("dev-a", Action.RECEIVE, "fg/v1/dev/dev-a/cmd/open"),
        Disconnected("dev-a"),
    ]
    assert remote.startswith("127.0.0.1:")


async def test_enrollees_and_the_internal_client_are_not_observed(
    observed: tuple[Env, list[Observation]],
) -> None:
    env, seen = observed
    async with env.enrollee("dev-e1") as enrollee, env.internal("gateway") as gateway:
        await enrollee.subscribe("fg/v1/enroll/dev-e1/resp", qos=1)
        await enrollee.subscribe("fg/v1/enroll/dev-e2/resp", qos=1)  # denied, not observed
        await enrollee.publish("fg/v1/enroll/dev-e1/req", b"hello", qos=1)
        await gateway.publish("fg/v1/enroll/dev-e1/resp", b"challenge", qos=1)
        await settle()
    await settle()
    assert env.broker.metrics["denied.subscribe"] == 1  # the ACL did run
    assert seen == []


async def test_operators_and_services_are_observed(
    observed: tuple[Env, list[Observation]],
) -> None:
    env, seen = observed
    env.states.update({"alice": IdentityState.ACTIVE, "gateway": IdentityState.ACTIVE})
    async with env.device("alice", kind=IdentityKind.OPERATOR) as alice:
        await alice.publish("fg/v1/admin/alice/req", b"{}", qos=1)
        await alice.publish("fg/v1/dev/dev-a/cmd/open", b"x", qos=1)
    async with env.device("gateway", kind=IdentityKind.SERVICE) as service:
        await service.publish("fg/v1/pki/ca", b"chain", qos=1)
    await wait_until(lambda: sum(isinstance(o, Disconnected) for o in seen) == 2)
    assert [o for o in seen if not isinstance(o, Connected)] == [
        Published("alice", "fg/v1/admin/alice/req", 2),
        Denied("alice", Action.PUBLISH, "fg/v1/dev/dev-a/cmd/open"),
        Disconnected("alice"),
        Published("gateway", "fg/v1/pki/ca", 5),
        Disconnected("gateway"),
    ]


async def test_a_will_is_observed_as_a_publish_or_a_denial(
    observed: tuple[Env, list[Observation]],
) -> None:
    env, seen = observed
    env.states["dev-a"] = IdentityState.ACTIVE
    writer = await _abrupt_device(env, "fg/v1/dev/dev-a/state")
    writer.transport.abort()
    await wait_until(lambda: Disconnected("dev-a") in seen)
    writer = await _abrupt_device(env, "fg/v1/dev/dev-a/state")
    env.states["dev-a"] = IdentityState.QUARANTINED
    writer.transport.abort()
    await wait_until(lambda: seen.count(Disconnected("dev-a")) == 2)
    assert [o for o in seen if isinstance(o, Published | Denied)] == [
        Published("dev-a", "fg/v1/dev/dev-a/state", len(b"gone")),
        Denied("dev-a", Action.PUBLISH, "fg/v1/dev/dev-a/state"),
    ]


async def test_a_failing_observer_is_logged_once_counted_and_changes_nothing(
    pki_env: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Observation] = []

    def broken(observation: Observation) -> None:
        calls.append(observation)
        raise RuntimeError("observer bug")

    env = make_env(pki_env, observer=broken)
    env.states.update({"dev-a": IdentityState.ACTIVE})
    await env.broker.start()
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.broker.embedded"):
            async with spying(env) as spy, env.device("dev-a") as a:
                await a.publish("fg/v1/dev/dev-a/telemetry", b"1", qos=1)
                await a.publish("fg/v1/dev/dev-a/telemetry", b"2", qos=1)
                await spy.wait_for("fg/v1/dev/dev-a/telemetry")
                await wait_until(lambda: len(spy.seen) == 2)
                assert "dev-a" in env.broker.connected()
            await wait_until(lambda: len(calls) == 4)  # connected, 2 published, disconnected
    finally:
        await env.broker.stop()
    assert spy.seen == [("fg/v1/dev/dev-a/telemetry", b"1"), ("fg/v1/dev/dev-a/telemetry", b"2")]
    assert env.broker.metrics["observer.errors"] == 4
    failures = [r for r in caplog.records if "observer failed" in r.getMessage()]
    assert len(failures) == 1


async def test_a_takeover_reports_the_end_of_the_old_session_first(
    observed: tuple[Env, list[Observation]],
) -> None:
    env, seen = observed
    env.states["dev-a"] = IdentityState.ACTIVE
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    first = await asyncio.open_connection("127.0.0.1", env.ports["operational"], ssl=ctx)
    first[1].write(connect_packet("dev-a"))
    assert (await first[0].readexactly(4))[3] == 0
    second = await asyncio.open_connection("127.0.0.1", env.ports["operational"], ssl=ctx)
    second[1].write(connect_packet("dev-a"))
    assert (await second[0].readexactly(4))[3] == 0
    second[1].close()
    first[1].close()
    await wait_until(lambda: seen.count(Disconnected("dev-a")) == 2)
    assert [type(o).__name__ for o in seen] == [
        "Connected",
        "Disconnected",
        "Connected",
        "Disconnected",
    ]
