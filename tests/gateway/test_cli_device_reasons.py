"""`fleetgate device quarantine/revoke` need a reason that says something, and every state
change is audited with who made it (the operator's login, as `cli:<user>`)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
from test_cli import fleetgate, home, seed_device

from gateway.store import IdentityState

__all__ = ["home"]  # a fixture, imported for the tests below


def history(home: Path, device_id: str) -> list[dict[str, object]]:
    code, output = fleetgate("device", "show", device_id, "--home", str(home), "--json")
    assert code == 0, output
    shown: list[dict[str, object]] = json.loads(output)["history"]
    return shown


@pytest.mark.parametrize("reason", ["", "   ", "\t\n"])
@pytest.mark.parametrize("action", ["quarantine", "revoke"])
def test_an_empty_or_blank_reason_is_refused_and_changes_nothing(
    home: Path, action: str, reason: str
) -> None:
    seed_device(home, "th-1", IdentityState.ACTIVE)
    extra = ["--yes"] if action == "revoke" else []
    code, output = fleetgate(
        "device", action, "th-1", "--reason", reason, *extra, "--home", str(home)
    )
    assert code == 2
    assert "--reason" in output and "must not be empty" in output
    code, output = fleetgate("device", "show", "th-1", "--home", str(home), "--json")
    assert json.loads(output)["state"] == "active"
    assert [h["action"] for h in history(home, "th-1")] == ["enroll"]


def test_revoke_refuses_a_blank_reason_before_asking_for_confirmation(home: Path) -> None:
    seed_device(home, "th-2", IdentityState.ACTIVE)
    code, output = fleetgate(
        "device", "revoke", "th-2", "--reason", " ", "--home", str(home), input="y\n"
    )
    assert code == 2 and "Revoke th-2?" not in output
    assert [h["action"] for h in history(home, "th-2")] == ["enroll"]


def test_each_change_is_audited_with_its_actor_and_reason(home: Path) -> None:
    seed_device(home, "th-3", IdentityState.ACTIVE)
    for args in (
        ("quarantine", "th-3", "--reason", "  odd traffic "),
        ("release", "th-3"),
        ("revoke", "th-3", "--reason", "stolen", "--yes"),
    ):
        code, output = fleetgate("device", *args, "--home", str(home))
        assert code == 0, output
    changes = history(home, "th-3")[1:]
    actor = f"cli:{getpass.getuser()}"
    assert [(h["action"], h["actor"], h["reasons"]) for h in changes] == [
        ("quarantine", actor, ["odd traffic"]),  # kept without the stray spaces
        ("release", actor, []),
        ("revoke", actor, ["stolen"]),
    ]
