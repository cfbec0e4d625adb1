"""`fleetgate bench ...`: benchmarks that print figures (ratios measured in one run)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import JsonOption, console, fail, print_json

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)

DevicesOption = Annotated[int, typer.Option(help="Simulated devices.")]
BrokerOption = Annotated[str, typer.Option(help="embedded (amqtt, in-process) or mosquitto.")]
WorkersOption = Annotated[
    int, typer.Option(help="Simulator processes (the devices' CPU is never the gateway's).")
]
ConcurrencyOption = Annotated[
    int,
    typer.Option(
        help="Enrollments in flight at once across the fleet (more than the gateway answers "
        "within a device's 10 s response timeout only brings retries)."
    ),
]
WorkDirOption = Annotated[
    Path | None,
    typer.Option(help="Keep the benchmark's home and logs here (default: a temporary folder)."),
]
OutputOption = Annotated[
    Path | None, typer.Option(help="Also write the JSON result to this file.")
]
TuningOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tuning",
        help="KEY=VALUE: measure a proposed change before it is made (see docs/benchmarks.md).",
    ),
]


@app.command("pki")
def pki_command(
    count: Annotated[int, typer.Option(help="Certificates to issue in each variant.")] = 2000,
    as_json: JsonOption = False,
) -> None:
    """Issuances/s through pki (template, sign, validate) against bare builder signing."""
    from gateway.bench_pki import render_pki_bench, run_pki_bench

    result = run_pki_bench(count)
    if as_json:
        print_json(result)
    else:
        console.print(render_pki_bench(result))


def _tuning(pairs: list[str] | None) -> dict[str, Any]:
    from gateway.bench.server import TUNINGS

    tuning: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in TUNINGS:
            fail(f"--tuning takes KEY=VALUE with KEY one of {', '.join(TUNINGS)}; got {pair!r}")
        try:
            tuning[key] = json.loads(value)
        except json.JSONDecodeError:
            tuning[key] = value
    return tuning


def _setup(
    devices: int,
    broker: str,
    workers: int,
    concurrency: int,
    work_dir: Path | None,
    tuning: list[str] | None,
    **extra: Any,
) -> Any:
    from gateway.bench.fleet import FleetSetup

    try:
        return FleetSetup(
            devices=devices,
            broker=broker,
            workers=workers,
            concurrency=concurrency,
            work_dir=work_dir,
            tuning=_tuning(tuning),
            **extra,
        )
    except (TypeError, ValueError) as exc:
        fail(str(exc))


def _finish(result: dict[str, Any], as_json: bool, output: Path | None) -> None:
    from gateway.bench.report import render

    _save(result, output)
    if as_json:
        print_json(result)
    else:
        console.print(render(result))


def _run(coro: Any) -> dict[str, Any]:
    from gateway.bench.server import ServerError
    from simulators.swarm import SwarmError

    try:
        result: dict[str, Any] = asyncio.run(coro)
    except (ServerError, SwarmError, TimeoutError) as exc:
        fail(str(exc) or type(exc).__name__)
    return result


def _gateway_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        fail(f"--gateways takes counts separated by commas, such as 1,2,3; got {text!r}")
    return counts


def _scaleout(
    gateways: str,
    database: str | None,
    broker: str,
    devices: int,
    concurrency: int | None,
    timeout: float,
    repeats: int,
    work_dir: Path | None,
    tuning: list[str] | None,
    as_json: bool,
    output: Path | None,
) -> None:
    """``bench enroll --gateways``: rounds of 1..N clustered gateways on one PostgreSQL server
    and one Mosquitto (gateway.bench_scaleout)."""
    from gateway.bench_scaleout import (
        ScaleoutError,
        ScaleoutOptions,
        render_scaleout,
        run_scaleout_bench,
    )

    if broker != "mosquitto":
        fail("--gateways needs --broker mosquitto: the gateways of a cluster share one Mosquitto")
    if database is None:
        fail("--gateways needs --database postgresql://user@host/db: the gateways of a cluster "
             "share one PostgreSQL registry (each round creates a database of its own there)")
    if tuning:
        fail("--tuning measures one gateway; it does not apply to --gateways")
    try:
        options = ScaleoutOptions(
            database_url=database,
            gateways=_gateway_counts(gateways),
            devices=devices,
            concurrency=concurrency if concurrency is not None else 96,
            timeout=timeout,
            repeats=repeats,
            work_dir=work_dir,
        )
    except ValueError as exc:
        fail(str(exc))
    try:
        result = asyncio.run(
            run_scaleout_bench(options, None if as_json else lambda line: console.print(line))
        )
    except ScaleoutError as exc:
        fail(str(exc))
    _save(result, output)
    if as_json:
        print_json(result)
    else:
        typer.echo(render_scaleout(result))  # a wide table: not wrapped to the terminal


@app.command("enroll")
def enroll_command(
    devices: DevicesOption = 1000,
    broker: BrokerOption = "embedded",
    workers: WorkersOption = 2,
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Enrollments in flight at once across the fleet (default 32; 96 with "
            "--gateways). More than the gateways answer within a device's 10 s response "
            "timeout only brings retries."
        ),
    ] = None,
    idle_samples: Annotated[
        int, typer.Option(help="Devices enrolled one at a time on the idle gateway first.")
    ] = 20,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (per round with --gateways).")
    ] = 1800.0,
    gateways: Annotated[
        str | None,
        typer.Option(
            help="Gateway counts to compare, such as 1,2,3: each round runs that many "
            "clustered gateways (needs --broker mosquitto and --database postgresql://...)."
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(
            help="With --gateways: passes over the counts, every other one reversed "
            "(1,2,3,3,2,1), averaged per count: the machine's speed drifts between rounds."
        ),
    ] = 1,
    database: Annotated[
        str | None,
        typer.Option(
            help="With --gateways: a PostgreSQL server URL whose user may create databases "
            "(one per round, dropped after)."
        ),
    ] = None,
    work_dir: WorkDirOption = None,
    output: OutputOption = None,
    tuning: TuningOption = None,
    as_json: JsonOption = False,
) -> None:
    """Onboard a fleet: first connect to operational mTLS session, against the floor. With
    --gateways: enrollments/s and gateway CPU per enrollment for 1, 2, 3... gateways."""
    if gateways is not None:
        _scaleout(gateways, database, broker, devices, concurrency, timeout, repeats, work_dir,
                  tuning, as_json, output)
        return
    if database is not None or repeats != 1:
        fail("--database and --repeats are for --gateways; one gateway is measured on a "
             "registry of its own, once")
    from gateway.bench.enroll import EnrollBenchOptions, run_enroll_bench

    setup = _setup(
        devices, broker, workers, concurrency if concurrency is not None else 32, work_dir, tuning
    )
    try:
        options = EnrollBenchOptions(
            setup, idle_samples=idle_samples, timeout=timeout, progress=not as_json
        )
    except ValueError as exc:
        fail(str(exc))
    _finish(_run(run_enroll_bench(options)), as_json, output)


@app.command("revoke")
def revoke_command(
    devices: DevicesOption = 1000,
    broker: BrokerOption = "embedded",
    revocations: Annotated[int, typer.Option(help="Devices revoked, one at a time.")] = 100,
    quarantines: Annotated[int, typer.Option(help="Devices quarantined, one at a time.")] = 100,
    workers: WorkersOption = 2,
    concurrency: ConcurrencyOption = 32,
    timeout: Annotated[float, typer.Option(help="Give up onboarding after this.")] = 1800.0,
    work_dir: WorkDirOption = None,
    output: OutputOption = None,
    tuning: TuningOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke and quarantine connected devices one at a time: time to cut and to refusal."""
    from gateway.bench.revoke import RevokeBenchOptions, run_revoke_bench

    # A cut device tries again at once, so the refusal of its reconnect is timed, not its
    # backoff.
    setup = _setup(
        devices,
        broker,
        workers,
        concurrency,
        work_dir,
        tuning,
        min_backoff=0.01,
        probe_reconnects=True,
    )
    try:
        options = RevokeBenchOptions(
            setup,
            revocations=min(revocations, devices),
            quarantines=min(quarantines, max(devices - revocations, 0)),
            timeout=timeout,
            progress=not as_json,
        )
    except ValueError as exc:
        fail(str(exc))
    _finish(_run(run_revoke_bench(options)), as_json, output)


@app.command("soak")
def soak_command(
    devices: DevicesOption = 2000,
    cert_lifetime: Annotated[
        int, typer.Option(help="Seconds of certificate life the devices ask for (>= 60).")
    ] = 60,
    minutes: Annotated[float, typer.Option(help="How long the fleet renews.")] = 10.0,
    broker: BrokerOption = "embedded",
    renew_fraction: Annotated[
        float | None, typer.Option(help="The gateway's renew-after fraction (default 2/3).")
    ] = None,
    workers: WorkersOption = 2,
    concurrency: ConcurrencyOption = 32,
    onboard_timeout: Annotated[
        float,
        typer.Option(help="Start the soak's clock after this many seconds of onboarding even "
                     "if not every device is operational yet."),
    ] = 600.0,
    work_dir: WorkDirOption = None,
    output: OutputOption = None,
    tuning: TuningOption = None,
    as_json: JsonOption = False,
) -> None:
    """Devices on short certificates renew continuously: renewals, failures, expiries."""
    from gateway.bench.soak import SoakBenchOptions, run_soak_bench

    setup = _setup(
        devices,
        broker,
        workers,
        concurrency,
        work_dir,
        tuning,
        cert_lifetime=cert_lifetime,
        renew_fraction=renew_fraction,
        reconnect_after_renewal=True,
    )
    try:
        options = SoakBenchOptions(
            setup, minutes=minutes, onboard_timeout=onboard_timeout, progress=not as_json
        )
    except ValueError as exc:
        fail(str(exc))
    _finish(_run(run_soak_bench(options)), as_json, output)


@app.command("detect")
def detect_command(
    short: Annotated[
        bool,
        typer.Option(
            "--short",
            help="~7 minutes: 10 devices warmed for 90 s, 30 s windows, a detector trusting "
            "one clean minute (anomaly.warmup_minutes = 1), 2,000 replayed device-hours. "
            "Default: ~23 minutes, 20 devices warmed for 7 min, 90 s windows, the gateway's "
            "own anomaly defaults, 10,000 replayed device-hours.",
        ),
    ] = False,
    broker: BrokerOption = "embedded",
    devices: Annotated[
        int | None, typer.Option(help="Normal devices running beside the hostile ones.")
    ] = None,
    offline_hours: Annotated[
        float | None,
        typer.Option(
            help="Normal device-hours replayed offline for the false-alert rate (0: none)."
        ),
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--setting",
            help="KEY=TOML literal for the gateway's anomaly table (thresholds.spike_z=6.0); "
            "the offline replay uses it too.",
        ),
    ] = None,
    offline_only: Annotated[
        bool, typer.Option("--offline-only", help="No live gateway: the offline replay alone.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the offline replay.")] = 0,
    work_dir: WorkDirOption = None,
    output: OutputOption = None,
    as_json: JsonOption = False,
) -> None:
    """Hostile devices among a normal fleet on a live gateway: per scenario precision,
    recall and time to detection; false alerts per 1,000 normal device-hours."""
    from gateway.bench.detect import (
        DetectBenchError,
        DetectBenchOptions,
        render_detect,
        run_detect_bench,
        short_options,
    )

    changes: dict[str, Any] = {
        "broker": broker,
        "seed": seed,
        "live": not offline_only,
        "work_dir": work_dir,
        "progress": not as_json,
    }
    if setting:
        changes["detection_settings"] = _detection_settings(setting, short)
    if offline_hours is not None:
        changes["offline_device_hours"] = offline_hours
    try:
        if devices is not None:
            from simulators.scenarios import FleetPlan

            base = short_options() if short else DetectBenchOptions()
            changes["fleet"] = FleetPlan(
                devices=devices,
                warmup=base.fleet.warmup,
                telemetry_interval=base.fleet.telemetry_interval,
            )
        options = short_options(**changes) if short else DetectBenchOptions(**changes)
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    try:
        result = asyncio.run(run_detect_bench(options))
    except DetectBenchError as exc:
        fail(str(exc))
    _save(result, output)
    if as_json:
        print_json(result)
    else:
        console.print(render_detect(result))


def _detection_settings(pairs: list[str], short: bool) -> dict[str, str]:
    """``--setting KEY=VALUE`` pairs over the preset's own [anomaly] settings."""
    from gateway.bench.detect import SHORT_DETECTION_SETTINGS

    settings = dict(SHORT_DETECTION_SETTINGS) if short else {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            fail(f"--setting takes KEY=VALUE (a TOML literal); got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


@app.command("plot")
def plot_command(
    results: Annotated[list[Path], typer.Argument(help="JSON results written by --output.")],
    output: Annotated[Path, typer.Option(help="The PNG to write.")] = Path(
        "docs/benchmarks.png"
    ),
) -> None:
    """Draw onboarding rate and latency over time (and soak renewals) into one PNG."""
    from gateway.bench.plot import PlotUnavailable, plot_runs

    loaded = []
    for path in results:
        try:
            loaded.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"{path}: {exc}")
    try:
        console.print(f"wrote {plot_runs(loaded, output)}")
    except (PlotUnavailable, ValueError) as exc:
        fail(str(exc))


@app.command("console")
def console_bench_command(
    devices: Annotated[int, typer.Option(help="Synthetic rows in the fleet table.")] = 100_000,
    as_json: JsonOption = False,
) -> None:
    """Fleet table load, filter and sort times for a large fleet (offscreen Qt)."""
    from gateway.bench_console import render_console_bench, run_console_bench

    result = run_console_bench(devices)
    if as_json:
        print_json(result)
    else:
        console.print(render_console_bench(result))


@app.command("fuzz")
def fuzz_command(
    count: Annotated[int, typer.Option(help="Generated and mutated payloads.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed, to replay a run.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Feed payloads through the enrollment decoder and state machine; exit 1 on any crash."""
    from gateway.bench_fuzz import render_fuzz, run_fuzz

    result = run_fuzz(count, seed=seed)
    if as_json:
        print_json(result)
    else:
        console.print(render_fuzz(result))
    if result.get("crashes"):
        raise typer.Exit(1)


def _save(result: dict[str, Any], output: Path | None) -> None:
    """``--output``: the JSON result in a file as well (``fleetgate bench plot`` reads it)."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1, default=str) + "\n")
