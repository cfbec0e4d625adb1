"""gateway.faults: parsing FLEETGATE_FAULT, counting passes, firing once at the planned pass, and
every fault point wired where the crash tests expect it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import faults
from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.faults import (
    FAULT_ENV,
    FaultInjector,
    FaultPlan,
    FaultPoint,
    FaultSpecError,
    FaultSpecProblem,
    configure,
    fault_point,
)
from gateway.protocol import Challenge, IssuedCertificate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fired() -> Iterator[list[FaultPoint]]:
    """Arm an in-process injector whose action records instead of killing."""
    seen: list[FaultPoint] = []
    yield seen
    configure(None)


def arm(plan: FaultPlan, seen: list[FaultPoint]) -> FaultInjector:
    injector = FaultInjector(plan, action=seen.append)
    configure(injector)
    return injector


@pytest.mark.parametrize(
    ("text", "plan"),
    [
        ("after_signing", FaultPlan(FaultPoint.AFTER_SIGNING, 1)),
        ("after_row_written:3", FaultPlan(FaultPoint.AFTER_ROW_WRITTEN, 3)),
        (" after_publish:12 ", FaultPlan(FaultPoint.AFTER_PUBLISH, 12)),
    ],
)
def test_a_spec_names_a_point_and_a_pass(text: str, plan: FaultPlan) -> None:
    assert FaultPlan.parse(text) == plan
    assert FaultPlan.parse(str(plan)) == plan


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("after_sigining:1", FaultSpecProblem.UNKNOWN_POINT),
        ("", FaultSpecProblem.UNKNOWN_POINT),
        ("after_signing:", FaultSpecProblem.MALFORMED),
        ("after_signing:-1", FaultSpecProblem.MALFORMED),
        ("after_signing:two", FaultSpecProblem.MALFORMED),
        ("after_signing:0", FaultSpecProblem.BAD_COUNT),
        ("after_signing:1:2", FaultSpecProblem.MALFORMED),
    ],
)
def test_bad_specs_are_typed_errors(text: str, problem: FaultSpecProblem) -> None:
    with pytest.raises(FaultSpecError) as caught:
        FaultPlan.parse(text)
    assert caught.value.reason is problem


def test_plans_validate_their_types() -> None:
    with pytest.raises(TypeError):
        FaultPlan("after_signing", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FaultPlan(FaultPoint.AFTER_SIGNING, True)
    with pytest.raises(TypeError):
        FaultPlan.parse(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FaultInjector("after_signing:1")  # type: ignore[arg-type]


def test_the_action_runs_once_at_the_nth_pass_of_its_point(fired: list[FaultPoint]) -> None:
    injector = arm(FaultPlan(FaultPoint.AFTER_SIGNING, 3), fired)
    fault_point("after_row_written")
    fault_point("after_signing")
    fault_point("after_signing")
    assert fired == []
    fault_point("after_signing")
    assert fired == [FaultPoint.AFTER_SIGNING]
    fault_point("after_signing")
    assert fired == [FaultPoint.AFTER_SIGNING]
    assert injector.passes[FaultPoint.AFTER_SIGNING] == 4
    assert injector.passes[FaultPoint.AFTER_ROW_WRITTEN] == 1


def test_a_misspelt_point_fails_when_armed(fired: list[FaultPoint]) -> None:
    arm(FaultPlan(FaultPoint.AFTER_SIGNING), fired)
    with pytest.raises(ValueError):
        fault_point("after_sigining")


def test_the_environment_arms_the_injector() -> None:
    injector = FaultInjector.from_environment({FAULT_ENV: "after_nonce_issued:2"})
    assert injector.plan == FaultPlan(FaultPoint.AFTER_NONCE_ISSUED, 2)
    assert FaultInjector.from_environment({}).plan is None
    with pytest.raises(FaultSpecError):
        FaultInjector.from_environment({FAULT_ENV: "nowhere"})


def test_unarmed_points_cost_nothing_and_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    configure(None)
    for _ in range(3):
        fault_point("after_signing")
    assert faults._unarmed
    configure(None)


def test_the_armed_process_dies_by_sigkill_at_the_point() -> None:
    code = (
        "from gateway.faults import fault_point\n"
        "fault_point('after_publish')\n"
        "print('survived the first pass', flush=True)\n"
        "fault_point('after_publish')\n"
        "print('survived the second pass', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", FAULT_ENV: "after_publish:2", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == -9  # SIGKILL: no cleanup ran
    assert done.stdout == "survived the first pass\n"


def test_enrollment_passes_its_points_in_order(fired: list[FaultPoint]) -> None:
    gw = LoopbackGateway()
    injector = arm(FaultPlan(FaultPoint.AFTER_PUBLISH, 10**6), fired)
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    assert isinstance(challenge, Challenge)
    assert dict(injector.passes) == {FaultPoint.AFTER_NONCE_ISSUED: 1}
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)
    assert dict(injector.passes) == {
        FaultPoint.AFTER_NONCE_ISSUED: 1,
        FaultPoint.AFTER_CSR_VERIFIED: 1,
        FaultPoint.AFTER_SIGNING: 1,
        FaultPoint.AFTER_ROW_WRITTEN: 1,
    }


def _fault_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "fault_point"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.append(node.args[0].value)
    return names


def test_every_call_site_names_a_known_point() -> None:
    calls = [
        name
        for path in (ROOT / "gateway").rglob("*.py")
        if path.name != "faults.py"
        for name in _fault_calls(path)
    ]
    assert calls, "no fault points are wired"
    assert {FaultPoint(name) for name in calls} >= {
        FaultPoint.AFTER_NONCE_ISSUED,
        FaultPoint.AFTER_CSR_VERIFIED,
        FaultPoint.AFTER_SIGNING,
        FaultPoint.AFTER_ROW_WRITTEN,
    }
