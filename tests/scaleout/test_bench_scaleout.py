"""The scale-out benchmark: what it refuses, and one small run with one and two gateways through
``fleetgate bench enroll --gateways``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.bench.speed import speed_probe
from gateway.bench_scaleout import ScaleoutOptions, render_scaleout, summarize
from gateway.cli.bench import app

SERVER = "postgresql://fleetgate@127.0.0.1:5432/postgres"
runner = CliRunner()


@pytest.mark.parametrize(
    "changes",
    [
        {"database_url": "sqlite:///registry.db"},
        {"gateways": ()},
        {"gateways": (0,)},
        {"gateways": (1, 1)},
        {"gateways": (True,)},
        {"devices": 0},
        {"concurrency": 0},
        {"timeout": 0},
        {"idle_seconds": 0},
        {"repeats": 0},
        {"repeats": 6},
    ],
)
def test_options_a_round_cannot_run_with_are_refused(changes: dict[str, object]) -> None:
    values: dict[str, object] = {"database_url": SERVER, **changes}
    with pytest.raises(ValueError):
        ScaleoutOptions(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--gateways", "1,2", "--database", SERVER], "--broker mosquitto"),
        (["--gateways", "1,2", "--broker", "mosquitto"], "--database postgresql://"),
        (["--gateways", "1,2", "--broker", "mosquitto", "--database", "sqlite:///r.db"],
         "postgresql://"),
        (["--gateways", "1,two", "--broker", "mosquitto", "--database", SERVER], "1,2,3"),
        (["--gateways", "1,9", "--broker", "mosquitto", "--database", SERVER], "between 1 and 8"),
        (["--gateways", "1", "--broker", "mosquitto", "--database", SERVER, "--tuning",
          "pool_size=4"], "--tuning"),
        (["--database", SERVER], "--database and --repeats are for --gateways"),
        (["--repeats", "2"], "--database and --repeats are for --gateways"),
    ],
)
def test_combinations_the_cluster_bench_cannot_run_are_refused_before_anything_starts(
    args: list[str], said: str
) -> None:
    result = runner.invoke(app, ["enroll", *args])
    assert result.exit_code == 1
    assert said in " ".join(result.output.split())  # rich wraps long lines


def test_passes_alternate_direction_so_a_drift_weighs_on_every_count() -> None:
    options = ScaleoutOptions(database_url=SERVER, gateways=(1, 2, 3), repeats=3)
    assert [count for _, count in options.order()] == [1, 2, 3, 3, 2, 1, 1, 2, 3]
    assert [number for number, _ in options.order()] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_the_summary_averages_each_count_and_compares_with_one_gateway() -> None:
    def measured(gateways: int, cpu: float, idle: float) -> dict[str, float]:
        return {"gateways": gateways, "enrollments_per_s": 20.0,
                "gateway_cpu_ms_per_enrollment": cpu, "gateway_idle_cpu_ms_per_s": 10.0,
                "gateway_cpu_ms_per_enrollment_less_idle": cpu - idle,
                "broker_cpu_ms_per_enrollment": 8.0, "speed_probe_ms": 50.0, "device_retries": 0}

    rounds = [measured(2, 12.0, 1.0), measured(1, 10.0, 1.0), measured(1, 12.0, 1.0),
              measured(2, 14.0, 2.0)]
    one, two = summarize((2, 1), rounds)[::-1]
    assert (one["gateways"], one["rounds"], one["gateway_cpu_ms_per_enrollment"]) == (1, 2, 11.0)
    assert one["cpu_per_enrollment_vs_first"] == 1.0
    assert two["gateway_cpu_ms_per_enrollment"] == 13.0
    assert two["gateway_cpu_ms_per_enrollment_range"] == [12.0, 14.0]
    assert two["cpu_per_enrollment_vs_first"] == round(13 / 11, 3)
    assert two["cpu_less_idle_vs_first"] == round(11.5 / 10, 3)
    assert rounds[1]["cpu_per_enrollment_vs_first"] == round(10 / 11, 3)  # against the mean


def test_a_round_run_while_the_machine_was_slower_is_also_compared_at_its_speed() -> None:
    def measured(gateways: int, cpu: float, probe: float) -> dict[str, float]:
        return {"gateways": gateways, "enrollments_per_s": 20.0,
                "gateway_cpu_ms_per_enrollment": cpu, "gateway_idle_cpu_ms_per_s": 10.0,
                "gateway_cpu_ms_per_enrollment_less_idle": cpu,
                "broker_cpu_ms_per_enrollment": 3.0, "speed_probe_ms": probe,
                "device_retries": 0}

    # the 3-gateway round ran while the same fixed workload took 30 % longer
    rounds = [measured(1, 9.0, 50.0), measured(3, 13.0, 65.0)]
    one, three = summarize((1, 3), rounds)
    assert three["cpu_per_enrollment_vs_first"] == round(13 / 9, 3)  # the raw figure stays
    assert three["speed_adjusted_vs_first"] == round((13 / 65) / (9 / 50), 3)
    assert one["speed_adjusted_vs_first"] == 1.0
    assert rounds[1]["cpu_in_probe_units"] == round(13 / 65, 4)


def test_the_speed_probe_times_a_fixed_workload() -> None:
    assert speed_probe(runs=1) > 0
    with pytest.raises(ValueError):
        speed_probe(runs=0)


def test_an_unreachable_server_is_a_typed_error() -> None:
    dead = "postgresql://fleetgate:hunter2@127.0.0.1:1/postgres"
    result = runner.invoke(
        app, ["enroll", "--gateways", "1", "--broker", "mosquitto", "--database", dead]
    )
    assert result.exit_code == 1
    assert "database_unavailable" in result.output
    assert "hunter2" not in result.output  # the password stays out of the message


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(300)
def test_the_cli_measures_each_gateway_count_in_one_run(
    tmp_path: Path, postgres, mosquitto: None  # type: ignore[no-untyped-def]
) -> None:
    result = runner.invoke(
        app,
        ["enroll", "--gateways", "1,2", "--broker", "mosquitto", "--database", postgres.url,
         "--devices", "20", "--concurrency", "20", "--timeout", "120",
         "--work-dir", str(tmp_path), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rounds = report["rounds"]
    assert [r["gateways"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert entry["devices"] == 20 and entry["enrollments_per_s"] > 0
        assert entry["gateway_cpu_ms_per_enrollment"] > 0
        assert entry["broker_cpu_ms_per_enrollment"] > 0
        assert entry["gateway_idle_cpu_ms_per_s"] >= 0
        assert 0 <= entry["gateway_cpu_ms_per_enrollment_less_idle"] <= (
            entry["gateway_cpu_ms_per_enrollment"]
        )
        assert entry["device_retries"] == sum(entry["devices_met"].values())
        assert entry["gateway_wakeups_per_enrollment"] > 0  # requests wake the gateways up
        nodes = entry["per_gateway"]
        assert [n["node"] for n in nodes] == [f"gw-{i}" for i in range(1, entry["gateways"] + 1)]
        assert sum(n["leader"] for n in nodes) == 1  # one leader per round, named
        for node in nodes:  # the event loop apart from the worker threads
            assert node["loop_cpu_ms_per_enrollment"] > 0
            assert node["threads_cpu_ms_per_enrollment"] >= 0
    assert rounds[0]["cpu_per_enrollment_vs_first"] == 1.0
    assert rounds[1]["cpu_per_enrollment_vs_first"] > 0
    assert all(r["speed_probe_ms"] > 0 and r["speed_adjusted_vs_first"] > 0 for r in rounds)
    table = render_scaleout(report).splitlines()
    assert "gateways" in table[0] and "less idle" in table[0] and "speed-adj." in table[0]
    assert [line.split()[0] for line in table[1:3]] == ["1", "2"]
