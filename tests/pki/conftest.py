"""Fixtures for the PKI core: a fake clock and a gateway CA (root -> issuing) built on it."""

from __future__ import annotations

import pytest

from pki.ca import CertificateAuthority
from pki.clock import FakeClock
from pki.issue import Issuer
from pki.keys import KeyType
from pki.testing import make_issuing_ca

TRUST_DOMAIN = "fleet.example"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuing_ca(clock: FakeClock) -> CertificateAuthority:
    return make_issuing_ca(clock, KeyType.P256)


@pytest.fixture
def issuer(issuing_ca: CertificateAuthority, clock: FakeClock) -> Issuer:
    return Issuer(issuing_ca, clock)
