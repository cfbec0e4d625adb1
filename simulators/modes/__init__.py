"""Simulation modes: the well-behaved fleet and the hostile devices a gateway must withstand.

Each mode drives real devices over real MQTT and TLS against a running gateway and counts,
from the devices' side, what the gateway did to them. The summary keeps the fleet summary's
keys (``simulators.fleet.FleetSummary``) and adds:

- ``rejected``: protocol refusals by reason code (``gateway.protocol.reasons``);
- ``refused``: connections the broker turned away, by how (TLS, CONNACK, no rights);
- ``quarantined``: devices whose rights shrank to the quarantine outlet;
- ``cut``: live sessions the broker closed;
- ``denied``: (prober) subscriptions and publishes the broker did not let through;
- ``details``: what the mode itself measured.

Modes:

    normal   the fleet of ``simulators.fleet``: enroll, publish telemetry, renew
    replay   re-send a captured enrollment: the same bytes get the stored answer (no second
             certificate); under a new request id the captured enroll is refused (its CSR key
             is certified already: ``key_reused``, checked before the nonce); a new enroll
             signed for the spent challenge is refused ``nonce_reused``
    clone    two devices with one certificate, the second from another address (127.0.0.2 by
             default): the gateway refuses one session and quarantines the identity
    flood    one client sends hello after hello while other devices enroll; reports how much
             the storm slowed them (the goal: at most 20 %)
    rogue    birth certificates from a manufacturer the gateway does not trust
    tamper   a firmware digest that is not on the model's allow-list (the home needs one:
             ``simulators.factory.allow_simulated_firmware``)
    prober   an enrolled device tries other devices' topics: subscriptions, commands,
             impersonated renewals and the retained CRL
    exfil    an enrolled device behaves for a warm-up, then slowly raises its telemetry volume
             on its own topic (nothing is refused: only behaviour gives it away); the summary
             records when each device's behaviour started (``details["behaviour_started"]``)

Runners are registered by mode name; ``run_exfil(options, factory, stop, ramp)`` takes a ramp
other than the default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from pki.factory import FactoryCA
from simulators.modes.clone import run_clone
from simulators.modes.common import Mode, ModeOptions, ModeSummary
from simulators.modes.exfil import BEHAVIOUR_STARTED, EXFIL, ExfilRamp, Growth, run_exfil
from simulators.modes.flood import run_flood
from simulators.modes.normal import run_normal
from simulators.modes.prober import run_prober
from simulators.modes.refused import run_rogue, run_tamper
from simulators.modes.replay import run_replay

__all__ = [
    "BEHAVIOUR_STARTED",
    "MODE_NAMES",
    "ExfilRamp",
    "Growth",
    "Mode",
    "ModeOptions",
    "ModeSummary",
    "run_exfil",
    "run_mode",
]

Runner = Callable[[ModeOptions, FactoryCA, asyncio.Event], Awaitable[ModeSummary]]
_RUNNERS: dict[str, Runner] = {
    Mode.NORMAL.value: run_normal,
    Mode.REPLAY.value: run_replay,
    Mode.CLONE.value: run_clone,
    Mode.FLOOD.value: run_flood,
    Mode.ROGUE.value: run_rogue,
    Mode.TAMPER.value: run_tamper,
    Mode.PROBER.value: run_prober,
    EXFIL: run_exfil,  # with the default ramp
}
# Every mode a simulation can run, by name.
MODE_NAMES = tuple(_RUNNERS)


async def run_mode(
    options: ModeOptions, factory: FactoryCA, stop: asyncio.Event | None = None
) -> ModeSummary:
    """Run ``options.mode`` against the gateway; ``factory`` is the manufacturer it trusts."""
    stop = stop or asyncio.Event()
    began = time.monotonic()
    runner = _RUNNERS[options.mode.value]
    summary: ModeSummary = await runner(options, factory, stop)
    summary.mode = options.mode.value
    summary.seconds = time.monotonic() - began
    return summary
