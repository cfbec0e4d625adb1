"""prober: an enrolled device tries other devices' topics."""

from __future__ import annotations

import asyncio

from gateway.protocol import topics
from pki.factory import FactoryCA
from simulators.conversation import enroll_once
from simulators.device import (
    granted,
)
from simulators.factory import MODEL
from simulators.modes.common import (
    DELIVERY_SECONDS,
    ModeOptions,
    ModeSummary,
    open_session,
)


async def run_prober(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    pairs = max(options.devices // 2, 1)
    summary = ModeSummary(devices=2 * pairs)
    summary.details = {"leaked": 0, "attempts": 0}
    ids = options.ids("probe", 2 * pairs)
    for prober_id, victim_id in zip(ids[0::2], ids[1::2], strict=True):
        if stop.is_set():
            break
        await _probe_pair(options, factory, prober_id, victim_id, summary)
    return summary


async def _probe_pair(
    options: ModeOptions,
    factory: FactoryCA,
    prober_id: str,
    victim_id: str,
    summary: ModeSummary,
) -> None:
    enrolled = {}
    for device_id in (prober_id, victim_id):
        conversation = await enroll_once(factory.mint(device_id, MODEL), options.sensor())
        assert conversation.enrolled is not None
        enrolled[device_id] = conversation.enrolled
        summary.enrolled += 1
    victim = await open_session(options, enrolled[victim_id], victim_id, "")
    prober = await open_session(options, enrolled[prober_id], prober_id, "")
    try:
        for topic in (topics.commands_filter(victim_id), topics.renew_response(victim_id)):
            await victim.client.subscribe(topic, qos=1)
        # Subscriptions to other devices' topics and fleet-wide wildcards.
        for topic_filter in (
            topics.telemetry(victim_id),
            topics.commands_filter(victim_id),
            topics.renew_response(victim_id),
            topics.enroll_response(victim_id),
            f"{topics.PREFIX}/dev/+/telemetry",
            f"{topics.PREFIX}/#",
            "#",
        ):
            summary.details["attempts"] += 1
            if granted(await prober.client.subscribe(topic_filter, qos=1)):
                summary.details["leaked"] += 1
            else:
                summary.denied["subscribe"] += 1
        # Publishes into the victim's topics, and a renewal in its name (the gateway's answer
        # would reach the victim): a denied publish is acknowledged and dropped, so what the
        # victim receives is what tells.
        for topic in (
            topics.command(victim_id, "reboot"),
            topics.renew_response(victim_id),
            topics.renew_request(victim_id),
        ):
            summary.details["attempts"] += 1
            before = len(victim.received)
            await prober.client.publish(topic, b'{"probe":true}', qos=1)
            await asyncio.sleep(DELIVERY_SECONDS)
            if len(victim.received) > before:
                summary.details["leaked"] += 1
            else:
                summary.denied["publish"] += 1
        # A forged retained CRL must not replace the gateway's: the victim reads the retained one.
        summary.details["attempts"] += 1
        await prober.client.publish(topics.CRL_TOPIC, b"forged", qos=1, retain=True)
        await asyncio.sleep(DELIVERY_SECONDS)
        before = len(victim.received)
        await victim.client.subscribe(topics.CRL_TOPIC, qos=1)
        await asyncio.sleep(DELIVERY_SECONDS)
        retained = [p for t, p in victim.received[before:] if t == topics.CRL_TOPIC]
        if b"forged" in retained:
            summary.details["leaked"] += 1
        else:
            summary.denied["publish"] += 1
        summary.cut += int(prober.cut)
    finally:
        await prober.close()
        await victim.close()
