"""clone: two devices with one certificate."""

from __future__ import annotations

import asyncio
import time

import aiomqtt

from gateway.protocol import topics
from gateway.protocol.device import Enrolled
from pki.factory import BirthCredential, FactoryCA
from simulators.conversation import enroll_once
from simulators.factory import MODEL
from simulators.modes.common import (
    REACTION_SECONDS,
    ModeOptions,
    ModeSummary,
    Session,
    open_session,
)
from simulators.probe import Admission, admission
from simulators.tls import mutual_context


async def _quarantine_seen(sessions: list[Session], device_id: str, enrolled: Enrolled,
                           options: ModeOptions) -> bool:
    """Poll until the device's rights shrink to the quarantine outlet (or patience ends)."""
    deadline = time.monotonic() + REACTION_SECONDS
    while time.monotonic() < deadline:
        live = [s for s in sessions if not s.cut]
        if live:
            verdicts = [await s.rights(device_id) for s in live]
            if any(v is False for v in verdicts) and not any(v for v in verdicts):
                return True
        else:
            # Both sessions are gone: ask the broker afresh, as the device would reconnect.
            verdict = await admission(
                options.host,
                options.operational_port,
                mutual_context(
                    options.ca_pem, enrolled.key, enrolled.certificate, enrolled.chain[:-1]
                ),
                device_id,
                topics.commands_filter(device_id),
                timeout=options.response_timeout,
            )
            if verdict is Admission.SUBSCRIPTION_REFUSED:
                return True
        await asyncio.sleep(0.2)
    return False


async def _clone_one(
    options: ModeOptions, credential: BirthCredential, summary: ModeSummary
) -> None:
    device_id = credential.serial_number
    conversation = await enroll_once(credential, options.sensor())
    enrolled = conversation.enrolled
    assert enrolled is not None
    summary.enrolled += 1
    sessions = [await open_session(options, enrolled, device_id, "127.0.0.1")]
    try:
        try:
            sessions.append(await open_session(options, enrolled, device_id, options.clone_address))
        except aiomqtt.MqttError:
            summary.refused["clone_session"] += 1
        await asyncio.sleep(0.2)
        if await _quarantine_seen(sessions, device_id, enrolled, options):
            summary.quarantined += 1
        summary.cut += sum(1 for s in sessions if s.cut)
    finally:
        for session in sessions:
            await session.close()


async def run_clone(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    summary = ModeSummary(devices=options.devices)
    summary.details = {"clone_address": options.clone_address}
    for device_id in options.ids("clone"):
        if stop.is_set():
            break
        await _clone_one(options, factory.mint(device_id, MODEL), summary)
    return summary
