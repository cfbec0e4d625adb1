"""What one connected device costs the embedded broker: a small TLS receive buffer per
connection (large messages still arrive whole) and amqtt sessions without a state-machine
library behind each of them."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import itertools

import pytest
from amqtt.session import Session
from test_broker_embedded import (  # the broker test kit: PKI, clients, spy
    Env,
    env,
    pki_env,
    settle,
    spying,
)
from transitions import MachineError

from gateway.broker.amqtt_glue import CompactSession, SessionStates
from gateway.broker.tls import TLS_READ_BUFFER_BYTES
from gateway.store import IdentityState

__all__ = ["env", "pki_env"]  # fixtures, imported for the tests below


def tls_buffers(env: Env) -> list[int]:
    """The receive buffer of each live TLS connection the broker serves."""
    sizes = []
    for conn in env.broker._conns:
        protocol = getattr(conn.writer.transport, "_ssl_protocol", None)
        if isinstance(protocol, asyncio.sslproto.SSLProtocol):
            sizes.append(len(protocol._ssl_buffer))
    return sizes


@pytest.mark.broker
async def test_tls_connections_keep_a_small_buffer_and_large_messages_arrive_whole(
    env: Env,
) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    big = bytes(range(256)) * 600  # 150 kB, several TLS records, many socket reads
    async with (
        spying(env) as spy,
        env.device("dev-a") as device,
        env.enrollee("dev-e1"),
    ):
        assert tls_buffers(env) == [TLS_READ_BUFFER_BYTES, TLS_READ_BUFFER_BYTES]
        await device.publish("fg/v1/dev/dev-a/telemetry", big, qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/telemetry")
        received: list[bytes] = []

        async def take_one() -> None:
            async for message in device.messages:
                received.append(bytes(message.payload))  # type: ignore[arg-type]
                return

        await device.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)
        taker = asyncio.create_task(take_one())
        await settle(0.05)
        async with env.internal("gateway") as gateway:
            await gateway.publish("fg/v1/dev/dev-a/cmd/firmware", big[::-1], qos=1)
        await asyncio.wait_for(taker, 5)
    assert spy.seen[0] == ("fg/v1/dev/dev-a/telemetry", big)
    assert received == [big[::-1]]
    # only the broker's own connections: asyncio's default for everything else in the process
    assert asyncio.sslproto.SSLProtocol.max_size == 256 * 1024


@pytest.mark.broker
async def test_the_broker_makes_compact_sessions(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    async with env.device("dev-a"):
        broker = env.broker._broker
        assert broker is not None
        session, _ = broker.sessions["dev-a"]
        assert isinstance(session, CompactSession)
        assert session.transitions.state == "connected"
        assert session.last_connect_time is not None


def test_session_states_follow_amqtts_state_machine() -> None:
    """Every sequence of triggers leaves amqtt's transitions.Machine and SessionStates in the
    same state, raising on the same steps (connect while connected is how amqtt's broker
    notices a takeover)."""
    for steps in itertools.product(("connect", "disconnect"), repeat=5):
        upstream = Session()
        compact = CompactSession()
        assert isinstance(compact.transitions, SessionStates)
        for step in steps:
            outcomes = []
            for session in (upstream, compact):
                try:
                    getattr(session.transitions, step)()
                    outcomes.append("ok")
                except MachineError:
                    outcomes.append("refused")
            assert outcomes[0] == outcomes[1], steps
            assert upstream.transitions.state == compact.transitions.state, steps
            assert upstream.transitions.is_connected() == compact.transitions.is_connected()
            assert (upstream.last_connect_time is None) == (compact.last_connect_time is None)
            assert (upstream.last_disconnect_time is None) == (
                compact.last_disconnect_time is None
            )
