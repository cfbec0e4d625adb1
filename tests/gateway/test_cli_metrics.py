"""`fleetgate metrics`: what an operator reads of the file a running gateway writes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.metrics_export import MetricsSnapshot, metrics_path, render, write_atomically

runner = CliRunner()


def fleetgate(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["metrics", *args])
    return result.exit_code, result.output


def write(
    home: Path,
    *,
    node: str = "gw-1",
    age: timedelta = timedelta(seconds=3),
    up: bool = True,
    cluster: bool = False,
    **sections: dict[str, float],
) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    at = datetime.now(UTC) - age
    path = metrics_path(home, node if cluster else None)
    write_atomically(path, render(MetricsSnapshot(node, at, sections, up)))
    return path


def table_rows(output: str) -> set[tuple[str, ...]]:
    lines = [line for line in output.splitlines() if "│" in line]
    return {tuple(cell.strip() for cell in line.split("│")) for line in lines}


def test_the_table_shows_every_counter_by_section_and_how_old_it_is(tmp_path: Path) -> None:
    write(
        tmp_path,
        enrollment={"rejected.csr_overreach": 3, "issued": 1200},
        broker={"refused.not_admitted": 2},
    )
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 0, output
    assert "gateway gw-1" in output
    assert re.search(r"counts of .+, \d+ s ago", output)
    assert table_rows(output) == {
        ("enrollment", "issued", "1,200"),
        ("", "rejected.csr_overreach", "3"),
        ("gateway", "(nothing counted)", ""),
        ("broker", "refused.not_admitted", "2"),
        ("admin", "(nothing counted)", ""),
    }
    assert "is the gateway running?" not in output


def test_json_has_the_admin_ops_shape_and_the_files_age(tmp_path: Path) -> None:
    path = write(tmp_path, age=timedelta(seconds=5), admin={"requests": 4})
    code, output = fleetgate("--home", str(tmp_path), "--json")
    assert code == 0, output
    data = json.loads(output)
    assert data["node"] == "gw-1"
    assert data["admin"] == {"requests": 4}
    assert data["enrollment"] == data["gateway"] == data["broker"] == {}
    assert data["file"] == str(path)
    assert 5 <= data["age_seconds"] < 30
    assert (data["up"], data["stale"]) == (True, False)


def test_no_file_is_an_error_asking_whether_the_gateway_runs(tmp_path: Path) -> None:
    code, output = fleetgate("--home", str(tmp_path / "nowhere"))
    assert code == 1
    assert "is the gateway running?" in output
    assert "nowhere/metrics.prom" in output.replace("\n", "")  # the path it looked for


def test_a_file_nobody_updates_any_more_is_flagged(tmp_path: Path) -> None:
    write(tmp_path, age=timedelta(minutes=5))
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 0
    assert "not updated for 5 min" in output and "is the gateway running?" in output
    code, output = fleetgate("--home", str(tmp_path), "--json")
    assert json.loads(output)["stale"] is True


def test_a_gateway_that_stopped_left_its_last_counts(tmp_path: Path) -> None:
    write(tmp_path, age=timedelta(hours=2), up=False, gateway={"clones": 1})
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 0
    assert "the gateway stopped" in output and "2 h 0 min ago" in output
    assert "not updated" not in output
    data = json.loads(fleetgate("--home", str(tmp_path), "--json")[1])
    assert (data["up"], data["stale"], data["gateway"]) == (False, False, {"clones": 1})


def test_a_damaged_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "metrics.prom").write_text("fleetgate_up{node=\"gw-1\"} 1\nrubbish here\n")
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 1
    assert "cannot read the metrics file" in output and "line 2" in output


def test_counter_names_are_printed_as_they_are_not_as_markup(tmp_path: Path) -> None:
    write(tmp_path, enrollment={"rejected.[bold]x[/bold]": 1})
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 0
    assert ("enrollment", "rejected.[bold]x[/bold]", "1") in table_rows(output)


def test_cluster_members_sharing_a_home_are_told_apart_by_node(tmp_path: Path) -> None:
    write(tmp_path, node="gw-1", cluster=True, enrollment={"issued": 1})
    code, output = fleetgate("--home", str(tmp_path), "--json")
    assert code == 0 and json.loads(output)["node"] == "gw-1"  # the only one: no need to ask
    write(tmp_path, node="gw-2", cluster=True, enrollment={"issued": 2})
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 2
    assert "--node" in output and "gw-1, gw-2" in output
    code, output = fleetgate("--home", str(tmp_path), "--node", "gw-2", "--json")
    assert code == 0 and json.loads(output)["enrollment"] == {"issued": 2}


@pytest.mark.parametrize("node", ["../etc", "a/b", ""])
def test_a_node_name_that_is_no_node_name_is_refused(tmp_path: Path, node: str) -> None:
    code, output = fleetgate("--home", str(tmp_path), "--node", node)
    assert code == 2 and "--node" in output


def test_the_one_cluster_member_still_running_is_chosen_without_asking(tmp_path: Path) -> None:
    """Files of members that stopped (up 0) or were killed (not rewritten for minutes) stay
    behind; the one running is the one an operator means."""
    write(tmp_path, node="gw-old", cluster=True, up=False, age=timedelta(days=2))
    write(tmp_path, node="gw-killed", cluster=True, age=timedelta(hours=1))
    write(tmp_path, node="gw-now", cluster=True, enrollment={"issued": 7})
    code, output = fleetgate("--home", str(tmp_path), "--json")
    assert code == 0, output
    assert json.loads(output)["node"] == "gw-now"
    # two running: which one is the operator's to say
    write(tmp_path, node="gw-also", cluster=True)
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 2 and "gw-also, gw-now" in output.replace("\n", " ")
    assert "gw-old" not in output


def test_none_running_lists_them_all(tmp_path: Path) -> None:
    write(tmp_path, node="gw-1", cluster=True, up=False)
    write(tmp_path, node="gw-2", cluster=True, up=False)
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 2
    assert "none of them runs" in output and "gw-1, gw-2" in output.replace("\n", " ")


def test_a_damaged_line_with_brackets_is_shown_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "metrics.prom").write_text('fleetgate_up{node="gw-1"} 1\nrubbish [/] here\n')
    code, output = fleetgate("--home", str(tmp_path))
    assert code == 1, output
    assert "line 2" in output and "rubbish [/] here" in output


def test_a_home_with_brackets_in_its_path_is_named_right(tmp_path: Path) -> None:
    home = tmp_path / "fleet[prod]" / "h"
    code, output = fleetgate("--home", str(home))
    assert code == 1
    assert "fleet[prod]/h/metrics.prom" in output.replace("\n", "")
