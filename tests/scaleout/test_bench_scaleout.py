"""The scale-out benchmark: what it refuses, and one small run with one and two gateways."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.bench_scaleout import ScaleoutOptions, render_scaleout, run_scaleout_bench

SERVER = "postgresql://fleetgate@127.0.0.1:5432/postgres"


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
    ],
)
def test_options_a_round_cannot_run_with_are_refused(changes: dict[str, object]) -> None:
    values: dict[str, object] = {"database_url": SERVER, **changes}
    with pytest.raises(ValueError):
        ScaleoutOptions(**values)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(240)
async def test_a_small_run_measures_each_gateway_count(
    tmp_path: Path, postgres, mosquitto: None  # type: ignore[no-untyped-def]
) -> None:
    result = await run_scaleout_bench(
        ScaleoutOptions(
            database_url=postgres.url, gateways=(1, 2), devices=20, concurrency=20,
            timeout=120, work_dir=tmp_path,
        )
    )
    rounds = result["rounds"]
    assert [r["gateways"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert entry["devices"] == 20 and entry["enrollments_per_s"] > 0
        assert entry["gateway_cpu_ms_per_enrollment"] > 0
        assert entry["broker_cpu_ms_per_enrollment"] > 0
    assert rounds[0]["cpu_per_enrollment_vs_first"] == 1.0
    assert "gateways" in render_scaleout(result).splitlines()[0]
