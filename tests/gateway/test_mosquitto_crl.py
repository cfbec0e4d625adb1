"""Keeping Mosquitto's CRL valid: an expired CRL is refused before it can lock everyone out, and
``needs_refresh`` says when the cluster's keeper re-signs (a gateway's own re-signing is in
test_crl_validity)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
    MosquittoReason,
    ServerTlsMaterial,
    check_crl,
    needs_refresh,
)
from pki.clock import FakeClock
from pki.crl import build_crl
from pki.testing import make_issuing_ca

CLOCK = FakeClock()
CA = make_issuing_ca(CLOCK)
VALIDITY = timedelta(hours=1)


def crl_pem(clock: FakeClock = CLOCK, number: int = 1) -> bytes:
    return build_crl(CA, [], clock, VALIDITY, number).public_bytes(Encoding.PEM)


def test_a_fresh_crl_is_accepted_and_an_expired_one_refused() -> None:
    pem = crl_pem()
    assert check_crl(pem, CLOCK.now()).next_update_utc == CLOCK.now() + VALIDITY
    with pytest.raises(MosquittoError) as caught:
        check_crl(pem, CLOCK.now() + VALIDITY)
    assert caught.value.reason is MosquittoReason.CRL_EXPIRED


@pytest.mark.parametrize(
    "garbage", [b"", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"]
)
def test_what_is_not_a_crl_is_refused(garbage: bytes) -> None:
    with pytest.raises(MosquittoError) as caught:
        check_crl(garbage, CLOCK.now())
    assert caught.value.reason is MosquittoReason.INVALID_CRL


def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(TypeError):
        check_crl("pem", CLOCK.now())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check_crl(crl_pem(), CLOCK.now().replace(tzinfo=None))
    with pytest.raises(ValueError):
        needs_refresh(None, CLOCK.now(), timedelta(seconds=-1))


def test_refresh_is_due_when_missing_unreadable_or_near_expiry() -> None:
    now = CLOCK.now()
    margin = timedelta(minutes=10)
    assert needs_refresh(None, now, margin)
    assert needs_refresh(b"junk", now, margin)
    assert not needs_refresh(crl_pem(), now, margin)
    assert needs_refresh(crl_pem(), now + VALIDITY - margin, margin)


async def test_the_broker_refuses_an_expired_crl_before_touching_anything(tmp_path: Path) -> None:
    cert, key = b"-----BEGIN CERTIFICATE-----", b"-----BEGIN PRIVATE KEY-----"
    material = ServerTlsMaterial(cert, key, cert)
    clock = FakeClock()
    broker = MosquittoBroker(tmp_path / "run", Listeners(), material, crl_pem(clock), clock=clock)
    stale = crl_pem(clock)
    clock.advance(VALIDITY)
    with pytest.raises(MosquittoError) as caught:
        await broker.publish_crl(stale)
    assert caught.value.reason is MosquittoReason.CRL_EXPIRED
    assert not (tmp_path / "run").exists()
