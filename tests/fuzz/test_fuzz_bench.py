"""gateway.bench_fuzz: the long fuzz run's machinery, run short. The million-payload run is made
outside the suite (``python -m gateway.bench_fuzz --count 1000000``; figures in
docs/security.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.table import Table

from gateway import bench_fuzz
from gateway.bench_fuzz import render_fuzz, run_fuzz
from gateway.enrollment import service as service_module


def test_a_short_run_reaches_deep_decisions_without_crashing() -> None:
    result = run_fuzz(10_000, seed=11)
    assert result["count"] == 10_000 and result["seed"] == 11
    assert result["rate"] > 0 and result["seconds"] > 0
    # Every crash the fuzzer ever found is fixed (docs/security.md): any crash now is a new one.
    assert result["crashes"] == 0, result["crash_signatures"]
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 10_000
    # Mutants get past the decoder into every stage: chains, CSRs, nonces, signatures, issuance.
    for reached in (
        "error.malformed",
        "error.invalid_field",
        "error.unknown_type",
        "challenge",
        "certificate",
        "error.bad_encoding",
        "error.renewal_signature_invalid",
        "ignored",
    ):
        assert outcomes.get(reached, 0) > 0, (reached, outcomes)


def test_an_internal_error_the_service_contains_is_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    original = service_module.decode_request

    def fragile(payload: bytes) -> Any:
        if b'"type":"x"' in payload:
            raise RuntimeError("decoder bug")
        return original(payload)

    monkeypatch.setattr(service_module, "decode_request", fragile)
    result = run_fuzz(600, seed=5)
    assert result["crashes"] > 0
    assert any(s.startswith("RuntimeError in") for s in result["crash_signatures"])


def test_a_handler_that_raises_is_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    original = service_module.EnrollmentService.handle

    def raising(self: Any, topic: str, payload: bytes) -> Any:
        if "fz-other" in topic:  # a mutant sent as another device; never in the corpus
            raise KeyError("escaped")
        return original(self, topic, payload)

    monkeypatch.setattr(service_module.EnrollmentService, "handle", raising)
    result = run_fuzz(1000, seed=6)
    assert result["crashes"] > 0
    assert any(s.startswith("KeyError") for s in result["crash_signatures"])


@pytest.mark.parametrize(
    ("count", "error"), [(0, ValueError), ("10", TypeError), (True, TypeError)]
)
def test_bad_counts_are_refused(count: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        run_fuzz(count)  # type: ignore[arg-type]


def test_the_report_renders_and_the_module_runs(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_fuzz(50, seed=1)
    table = render_fuzz(result)
    assert isinstance(table, Table) and table.row_count >= 3
    code = bench_fuzz.main(["--count", "50", "--seed", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == 50
    assert code == (1 if printed["crashes"] else 0)
