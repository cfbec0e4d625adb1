"""One device's enrollment over one connection, every message kept: the building block of the
hostile simulations (a replay needs the exact bytes of a captured request) and of the
benchmark's probes (a real operational certificate to open handshakes with)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiomqtt

from gateway.protocol.device import DeviceClient, Enrolled, Event, Rejected, Send
from gateway.protocol.topics import Channel
from pki.clock import SystemClock
from pki.factory import BirthCredential
from simulators.device import SensorOptions, SessionRefused, granted
from simulators.tls import NODELAY, mutual_context, shared_server_auth_context

__all__ = ["Conversation", "EnrollmentFailed", "Exchange", "ask", "enroll_once", "open_session"]


class EnrollmentFailed(RuntimeError):
    """The gateway refused the device for good, or did not answer in time."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Exchange:
    """One request as published and the response it got, byte for byte."""

    request_topic: str
    request: bytes
    response_topic: str
    response: bytes


@dataclass
class Conversation:
    device_id: str
    exchanges: list[Exchange] = field(default_factory=list)
    enrolled: Enrolled | None = None
    rejected: list[Rejected] = field(default_factory=list)


def _client(
    device_id: str, options: SensorOptions, channel: Channel, machine: DeviceClient | None = None
) -> aiomqtt.Client:
    if channel is Channel.ENROLL:
        tls, port = shared_server_auth_context(options.ca_pem), options.enrollment_port
    else:
        assert machine is not None and machine.current is not None
        current = machine.current
        tls = mutual_context(options.ca_pem, current.key, current.certificate, current.chain[:-1])
        port = options.operational_port
    return aiomqtt.Client(
        options.host,
        port,
        identifier=device_id,
        tls_context=tls,
        timeout=options.response_timeout,
        bind_address=options.bind_address,
        socket_options=NODELAY,
    )


async def _next(messages: AsyncIterator[aiomqtt.Message], timeout: float) -> aiomqtt.Message:
    return await asyncio.wait_for(messages.__anext__(), timeout)


async def enroll_once(
    credential: BirthCredential, options: SensorOptions, *, machine: DeviceClient | None = None
) -> Conversation:
    """Enroll over one connection to the enrollment listener and return every exchange.
    Raises ``EnrollmentFailed`` on a final refusal or when an answer does not come in time;
    ``aiomqtt.MqttError`` when the broker refuses the connection."""
    machine = machine or DeviceClient(
        credential,
        firmware=options.firmware,
        clock=SystemClock(),
        response_timeout=options.response_timeout,
        lifetime=options.cert_lifetime,
    )
    conversation = Conversation(machine.device_id)
    async with _client(machine.device_id, options, Channel.ENROLL) as client:
        for topic in machine.subscriptions(Channel.ENROLL):
            await client.subscribe(topic, qos=1)
        messages = client.messages.__aiter__()
        events: list[Event] = machine.start()
        while True:
            sends = [e for e in events if isinstance(e, Send)]
            for event in events:
                if isinstance(event, Enrolled):
                    conversation.enrolled = event
                    return conversation
                if isinstance(event, Rejected):
                    conversation.rejected.append(event)
                    if event.final:
                        raise EnrollmentFailed(event.reason, event.detail)
            if not sends:
                # a refusal worth retrying: the machine says when; a simulation does not wait
                raise EnrollmentFailed(
                    conversation.rejected[-1].reason if conversation.rejected else "no_answer"
                )
            send = sends[0]
            await client.publish(send.topic, send.payload, qos=1)
            try:
                message = await _next(messages, options.response_timeout)
            except TimeoutError:
                raise EnrollmentFailed("no_answer", f"nothing on {send.topic}") from None
            payload = bytes(message.payload) if isinstance(message.payload, bytes) else b""
            conversation.exchanges.append(
                Exchange(send.topic, send.payload, str(message.topic), payload)
            )
            events = machine.receive(str(message.topic), payload)


async def ask(
    client: aiomqtt.Client,
    messages: AsyncIterator[aiomqtt.Message],
    topic: str,
    payload: bytes,
    timeout: float,
) -> bytes:
    """Publish one request and return the next message's bytes (the response topic must be
    subscribed already)."""
    await client.publish(topic, payload, qos=1)
    message = await _next(messages, timeout)
    return bytes(message.payload) if isinstance(message.payload, bytes) else b""


def open_session(
    machine: DeviceClient, options: SensorOptions, channel: Channel = Channel.RENEW
) -> aiomqtt.Client:
    """An (unopened) client for ``machine`` on ``channel``: ``async with`` it."""
    return _client(machine.device_id, options, channel, machine)


async def subscribe_all(client: aiomqtt.Client, topic_filters: list[str]) -> None:
    """Subscribe, raising ``SessionRefused`` when the broker grants none of them."""
    for topic in topic_filters:
        if not granted(await client.subscribe(topic, qos=1)):
            raise SessionRefused(f"subscription to {topic} refused")
