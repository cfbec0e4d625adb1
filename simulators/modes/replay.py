"""replay: a captured enrollment sent again."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

import aiomqtt

from gateway.enrollment.testing import build_enroll
from gateway.protocol.codec import decode_request, decode_response, encode
from gateway.protocol.messages import Challenge, Enroll, IssuedCertificate
from pki.factory import BirthCredential, FactoryCA
from simulators.conversation import Conversation, enroll_once
from simulators.factory import MODEL
from simulators.modes.common import (
    ModeOptions,
    ModeSummary,
)
from simulators.storm import answer_kind
from simulators.tls import NODELAY, shared_server_auth_context


async def _replay_one(
    options: ModeOptions, credential: BirthCredential, summary: ModeSummary
) -> None:
    sensor = options.sensor()
    conversation: Conversation = await enroll_once(credential, sensor)
    summary.enrolled += 1
    hello, enroll = conversation.exchanges[0], conversation.exchanges[-1]
    captured = decode_request(enroll.request)
    challenge = decode_response(hello.response)
    assert isinstance(captured, Enroll) and isinstance(challenge, Challenge)
    first = decode_response(enroll.response)
    assert isinstance(first, IssuedCertificate)
    async with aiomqtt.Client(
        options.host,
        options.enrollment_port,
        identifier=credential.serial_number,
        tls_context=shared_server_auth_context(options.ca_pem),
        timeout=options.response_timeout,
        socket_options=NODELAY,
    ) as client:
        await client.subscribe(enroll.response_topic, qos=1)
        messages = client.messages.__aiter__()

        async def send(payload: bytes) -> bytes:
            await client.publish(enroll.request_topic, payload, qos=1)
            message = await asyncio.wait_for(messages.__anext__(), options.response_timeout)
            return bytes(message.payload) if isinstance(message.payload, bytes) else b""

        # 1. The very same bytes: the stored answer, byte for byte, and no second certificate.
        again = await send(enroll.request)
        if again == enroll.response:
            summary.details["same_answer"] += 1
        answer = decode_response(again)
        if isinstance(answer, IssuedCertificate) and answer.certificate != first.certificate:
            summary.details["second_certificates"] += 1
        # 2. The captured enroll under a new request id.
        renamed = dataclasses.replace(captured, id=secrets.token_urlsafe(12))
        summary.rejected[answer_kind(await send(encode(renamed)))] += 1
        # 3. A fresh enroll (new key, new evidence) for the challenge already spent.
        fresh, _ = build_enroll(
            credential,
            challenge.nonce,
            time=int(time.time()),
            request_id=secrets.token_urlsafe(12),
            firmware=sensor.firmware,
        )
        summary.rejected[answer_kind(await send(encode(fresh)))] += 1


async def run_replay(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    summary = ModeSummary(devices=options.devices)
    summary.details = {"same_answer": 0, "second_certificates": 0}
    for device_id in options.ids("replay"):
        if stop.is_set():
            break
        await _replay_one(options, factory.mint(device_id, MODEL), summary)
    return summary
