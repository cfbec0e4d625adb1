"""``fleetgate bench pki``: the numbers come back complete and render as a table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gateway.bench_pki import render_pki_bench, run_pki_bench
from pki.clock import FakeClock


def test_bench_reports_both_rates_and_their_ratio() -> None:
    result = run_pki_bench(count=40, clock=FakeClock())
    assert set(result) == {
        "count",
        "pki_per_s",
        "bare_per_s",
        "ratio",
        "key_type",
        "python",
        "cryptography",
        "machine",
    }
    assert result["count"] == 40
    pki_rate, bare_rate, ratio = result["pki_per_s"], result["bare_per_s"], result["ratio"]
    assert isinstance(pki_rate, float) and isinstance(bare_rate, float)
    assert pki_rate > 0 and bare_rate > 0
    assert ratio == pytest.approx(pki_rate / bare_rate, rel=0.01)
    assert result["key_type"] == "p256"


def test_bench_table_shows_every_figure() -> None:
    result = run_pki_bench(count=20, clock=FakeClock())
    output = io.StringIO()
    Console(file=output, width=120).print(render_pki_bench(result))
    text = output.getvalue()
    for fragment in ("Issuer.issue", "bare", "ratio", str(result["cryptography"])):
        assert fragment in text


@pytest.mark.parametrize("count", [0, 5, -1])
def test_bench_needs_a_real_count(count: int) -> None:
    with pytest.raises(ValueError):
        run_pki_bench(count=count)
