"""The benchmarks' building blocks: statistics, the bench home, process accounting, the report,
the plot, and the transport's fair queue."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gateway.bench.enroll import _measured_in_time, timeline
from gateway.bench.fleet import FleetSetup
from gateway.bench.floor import Floor
from gateway.bench.home import make_bench_home, set_setting
from gateway.bench.plot import plot_runs
from gateway.bench.procstat import ProcessSample, context_switches, main_thread_cpu, sample
from gateway.bench.report import render
from gateway.bench.server import GatewayProcess
from gateway.bench.stats import percentile, summarize_ms
from gateway.cli import app
from gateway.transport import FairQueue, Route, _Request


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.01) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_latencies_are_summarized_in_milliseconds() -> None:
    summary = summarize_ms([0.010, 0.020, 0.030], "x_")
    assert summary == {"x_p50_ms": 20.0, "x_p95_ms": 30.0, "x_p99_ms": 30.0, "x_max_ms": 30.0}
    assert summarize_ms([])["p50_ms"] is None


def test_a_setting_is_changed_in_its_table_keeping_the_comment() -> None:
    text = '[a]\nport = 1  # the port\n[b]\nport = 2\n'
    changed = set_setting(text, "b", "port", "0")
    assert changed == '[a]\nport = 1  # the port\n[b]\nport = 0\n'
    assert "port = 9  # the port" in set_setting(text, "a", "port", "9")
    with pytest.raises(KeyError):
        set_setting(text, "c", "port", "0")


def test_the_bench_home_runs_on_free_ports_with_the_simulated_factory(tmp_path: Path) -> None:
    settings = make_bench_home(tmp_path / "home", broker="mosquitto", renew_fraction=0.2)
    assert settings.broker.kind == "mosquitto"
    assert settings.broker.enrollment_port == 0 and settings.broker.operational_port == 0
    assert settings.certificates.renew_fraction == 0.2
    assert list(settings.manufacturers_dir.glob("*.pem"))
    assert settings.policy.firmware  # tamper simulations have something to refuse
    with pytest.raises(ValueError):
        make_bench_home(tmp_path / "other", broker="rabbitmq")


@pytest.mark.parametrize(
    "changes",
    [
        {"devices": 0},
        {"devices": True},
        {"broker": "rabbitmq"},
        {"workers": 0},
        {"concurrency": 0},
        {"cert_lifetime": 30},
    ],
)
def test_bad_fleet_setups_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        FleetSetup(**{"devices": 10, **changes})  # type: ignore[arg-type]


def test_an_unknown_tuning_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tuning"):
        GatewayProcess(tmp_path, "embedded", tuning={"turbo": True})
    result = CliRunner().invoke(app, ["bench", "enroll", "--tuning", "turbo=1"])
    assert result.exit_code == 1
    assert "--tuning takes KEY=VALUE" in result.output


def test_process_accounting_reads_this_process() -> None:
    sample_ = sample(os.getpid())
    assert sample_.cpu_seconds > 0 and sample_.rss_kb > 0
    assert sample_.peak_rss_kb >= sample_.rss_kb
    with pytest.raises(ProcessLookupError):
        sample(2**22 + 12345)
    with pytest.raises(ValueError):
        ProcessSample(0, 0.0, 0, 0)


def test_the_main_threads_cpu_leaves_out_what_other_threads_spend() -> None:
    def spin() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    main_before, all_before = main_thread_cpu(os.getpid()), sample(os.getpid()).cpu_seconds
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    main_spent = main_thread_cpu(os.getpid()) - main_before
    all_spent = sample(os.getpid()).cpu_seconds - all_before
    assert all_spent >= 0.25 and main_spent < 0.1
    with pytest.raises(ProcessLookupError):
        main_thread_cpu(2**22 + 12345)


def test_a_thread_that_sleeps_and_wakes_is_counted_as_a_switch() -> None:
    voluntary, _ = context_switches(os.getpid())
    for _ in range(5):
        time.sleep(0.002)  # each sleep gives the core up and is woken again
    assert context_switches(os.getpid())[0] >= voluntary + 5
    with pytest.raises(ProcessLookupError):
        context_switches(2**22 + 12345)


def test_the_timeline_bins_onboarding_by_second() -> None:
    starts = {"a": 0.0, "b": 0.5, "c": 1.0}
    operational = {"a": 0.2, "b": 0.9, "c": 2.5}
    rows = timeline(starts, operational, origin=0.0)
    assert [r["t"] for r in rows] == [0.0, 1.0, 2.0]
    assert [r["onboarded_per_s"] for r in rows] == [2.0, 0.0, 1.0]
    assert rows[0]["p99_ms"] == 400.0 and rows[2]["p50_ms"] == 1500.0


def _result(bench: str) -> dict[str, object]:
    return {
        "bench": bench,
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cores": 2},
        "versions": {"python": "3.11"},
        "parameters": {"broker": "embedded", "devices": 3, "cert_lifetime": 60},
        "devices": 3,
        "onboarded": 3,
        "p50_ms": 12.5,
        "renewals_during_soak": 4,
        "timeline": [
            {"t": 0.0, "onboarded_per_s": 2.0, "p50_ms": 10.0, "p99_ms": 20.0,
             "renewals_per_s": 0.5},
            {"t": 1.0, "onboarded_per_s": 1.0, "p50_ms": 15.0, "p99_ms": 25.0,
             "renewals_per_s": 0.2},
        ],
    }


def test_the_report_shows_the_figures_and_where_they_were_measured() -> None:
    console = Console(width=120, record=True)
    console.print(render(_result("enroll")))
    text = console.export_text()
    assert "devices onboarded" in text and "12.5 ms" in text
    assert "cores" in text and "--broker" in text


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = plot_runs([_result("enroll"), _result("soak")], tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_runs([{"bench": "revoke"}], tmp_path / "none.png")


def _request(key: str, n: int) -> _Request:
    return _Request(Route("t/#", lambda t, p: []), f"t/{key}", str(n).encode())


async def test_the_fair_queue_serves_devices_in_turn() -> None:
    queue = FairQueue(per_key=3)
    for n in range(3):
        assert queue.put("flood", _request("flood", n))
    assert not queue.put("flood", _request("flood", 3))  # over its bound: dropped
    assert queue.put("calm", _request("calm", 0))
    order = [(await queue.get()).topic for _ in range(4)]
    # The calm device waits for one flood request, not for all of them.
    assert order == ["t/flood", "t/calm", "t/flood", "t/flood"]
    assert len(queue) == 0
    waiter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    queue.put("late", _request("late", 0))
    assert (await asyncio.wait_for(waiter, 1.0)).topic == "t/late"


@pytest.mark.parametrize("bound", [0, -1, True, 1.5])
def test_a_fair_queue_needs_a_positive_bound(bound: object) -> None:
    with pytest.raises(ValueError):
        FairQueue(per_key=bound)  # type: ignore[arg-type]


def test_the_floor_under_load_replaces_only_its_enrollment() -> None:
    floor = Floor(2.5, 0.7, 1.8)
    assert floor.loaded_per_device_ms is None
    assert floor.as_dict()["floor_cpu_ms_per_device_under_load"] is None
    loaded = floor.under_load(3.5)
    assert loaded.per_device_ms == pytest.approx(5.0)  # the idle floor stays as it was
    assert loaded.loaded_per_device_ms == pytest.approx(6.0)
    assert loaded.as_dict()["floor_enroll_cpu_ms_under_load"] == 3.5


async def test_a_figure_measured_after_the_fleet_ended_is_not_reported_as_loaded() -> None:
    async def measured(at: float) -> tuple[float, float]:
        return 3.0, at

    early = asyncio.create_task(measured(10.0))
    late = asyncio.create_task(measured(30.0))
    await asyncio.sleep(0)
    assert await _measured_in_time(early, end=20.0) == 3.0
    assert await _measured_in_time(late, end=20.0) is None
    still_running = asyncio.create_task(asyncio.sleep(10, result=(3.0, 0.0)))
    assert await _measured_in_time(still_running, end=20.0) is None
    assert still_running.cancelled()
