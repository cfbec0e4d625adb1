"""`fleetgate sim`: simulated sensors, well-behaved or hostile, against a running gateway."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Annotated

import typer

from gateway.cli.common import HomeOption, JsonOption, console, fail, print_json, settings_for

MODES = ("normal", "replay", "clone", "flood", "rogue", "tamper", "prober", "exfil")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{text!r} is not HOST:PORT")
    return host, int(port)


def sim_command(
    devices: Annotated[
        int,
        typer.Option(
            help="How many sensors (normal: the fleet; flood: devices enrolling beside the "
            "storm; prober: probers and their victims; other modes: hostile devices)."
        ),
    ] = 25,
    mode: Annotated[str, typer.Option(help=f"One of: {', '.join(MODES)}.")] = "normal",
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(help="Enrollment listener HOST:PORT (default: from the home's settings)."),
    ] = None,
    operational_port: Annotated[
        int | None, typer.Option(help="Operational listener port (default: from settings).")
    ] = None,
    cert_lifetime: Annotated[
        int | None, typer.Option(help="Ask for certificates this short (seconds, >= 60).")
    ] = None,
    telemetry_interval: Annotated[float, typer.Option(help="Seconds between readings.")] = 5.0,
    clone_address: Annotated[
        str, typer.Option(help="clone: the address the second device connects from.")
    ] = "127.0.0.2",
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sensors with factory birth certificates enroll, publish telemetry and renew; or, with
    --mode, misbehave in one way and count what the gateway did about it."""
    from gateway.service import TRUST_REFRESH_SECONDS
    from simulators.factory import allow_simulated_firmware, place_factory_root
    from simulators.modes import Mode, ModeOptions, run_mode

    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    settings = settings_for(home)
    host, port = settings.broker.host, settings.broker.enrollment_port
    if gateway is not None:
        host, port = _address(gateway)
    if devices < 1:
        fail("--devices must be at least 1")
    if cert_lifetime is not None and cert_lifetime < 60:
        fail("--cert-lifetime must be at least 60 seconds")
    if mode == "tamper" and allow_simulated_firmware(settings.home):
        fail(
            "the simulated model had no firmware allow-list, so any image would be accepted; "
            f"one was added to {settings.home / 'fleetgate.toml'}: restart the gateway and "
            "run the tamper simulation again"
        )
    factory, placed = place_factory_root(settings)
    if placed:
        # A running gateway rereads its trust folder every TRUST_REFRESH_SECONDS.
        if not as_json:
            console.print("trusting the simulated manufacturer; waiting for the gateway to see it")
        time.sleep(TRUST_REFRESH_SECONDS + 0.5)
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    try:
        options = ModeOptions(
            mode=Mode(mode),
            devices=devices,
            duration=duration,
            host=host,
            enrollment_port=port,
            operational_port=operational_port or settings.broker.operational_port,
            ca_pem=ca_pem,
            cert_lifetime=cert_lifetime,
            telemetry_interval=telemetry_interval,
            clone_address=clone_address,
            progress=not as_json,
        )
    except (TypeError, ValueError) as exc:
        fail(str(exc))

    async def main() -> dict[str, object]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        summary = await run_mode(options, factory, stop)
        return summary.as_dict()

    # aiomqtt warns (as "mqtt") whenever more than ten publishes await their PUBACK, which a
    # burst of renewals does by design; the fleet reports lost connections itself.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    result = asyncio.run(main())
    if as_json:
        print_json(result)
    else:
        console.print(result)
