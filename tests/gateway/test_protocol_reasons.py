"""Reason codes: a superset of the PKI's, each with advice, each documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.protocol import Advice, ReasonCode, advice_for
from pki.errors import Reason

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_pki_reason_reaches_the_wire_unchanged() -> None:
    assert {r.value for r in Reason} <= {c.value for c in ReasonCode}


def test_codes_are_snake_case_and_equal_to_their_lower_case_names() -> None:
    for code in ReasonCode:
        assert code.value == code.name.lower()
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code.value)


@pytest.mark.parametrize("code", list(ReasonCode))
def test_every_code_has_advice(code: ReasonCode) -> None:
    assert isinstance(advice_for(code), Advice)


def test_advice_for_the_common_cases() -> None:
    assert advice_for(ReasonCode.UNAVAILABLE) is Advice.RETRY
    assert advice_for(ReasonCode.NONCE_EXPIRED) is Advice.RESTART
    assert advice_for(ReasonCode.CERTIFICATE_EXPIRED) is Advice.REATTEST
    assert advice_for(ReasonCode.DEVICE_REVOKED) is Advice.GIVE_UP
    assert advice_for("device_quarantined") is Advice.RESTART


def test_an_unknown_code_means_try_again_later() -> None:
    assert advice_for("something_from_the_future") is Advice.RESTART


@pytest.mark.parametrize("code", list(ReasonCode))
def test_every_code_is_documented_with_its_advice(code: ReasonCode) -> None:
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{code.value}`")]
    assert len(rows) == 1, f"{code.value} needs exactly one row in docs/protocol.md"
    assert advice_for(code).value in rows[0]
