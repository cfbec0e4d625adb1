"""The shared broker's keeper: it tells the gateways where the broker is (and keeps telling the
same after a restart), and installs only CRLs our issuing CA signed that are newer than the one
in force."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from scaleout_kit import free_port

from gateway.cluster import load_shared_broker
from gateway.cluster.keeper import BrokerKeeper
from gateway.config import load_settings
from gateway.home import init_home
from gateway.keystore_pkcs11 import Pkcs11KeyStore
from gateway.service import Gateway
from pki.ca import create_issuing_ca, create_root_ca
from pki.clock import SystemClock
from pki.crl import build_crl
from pki.keys import LocalSigner

pytestmark = [pytest.mark.slow, pytest.mark.broker]


@pytest.fixture
async def keeper(tmp_path: Path, mosquitto: None) -> AsyncIterator[BrokerKeeper]:
    init_home(tmp_path)  # a SQLite registry: the keeper needs no PostgreSQL of its own
    keeper = BrokerKeeper(load_settings(tmp_path), internal_port=free_port())
    await keeper.start()
    try:
        yield keeper
    finally:
        await keeper.stop()


async def test_the_descriptor_survives_a_keeper_restart(
    tmp_path: Path, keeper: BrokerKeeper
) -> None:
    first = load_shared_broker(tmp_path)
    assert first == keeper.shared
    await keeper.stop()
    again = BrokerKeeper(load_settings(tmp_path))
    await again.start()
    try:
        # running gateways reconnect to the same ports with the same admin password
        assert load_shared_broker(tmp_path) == first
    finally:
        await again.stop()
        await keeper.start()  # the fixture stops it


async def test_only_a_newer_crl_of_our_issuing_ca_is_installed(
    tmp_path: Path, keeper: BrokerKeeper
) -> None:
    gateway = Gateway(load_settings(tmp_path), broker_kind="mosquitto")  # builds CRLs, not started
    installed = keeper.broker.run_dir / "crl.pem"
    ours = gateway.crl_pem()
    assert await keeper.install_crl(ours) is True
    assert installed.read_bytes() == ours
    assert await keeper.install_crl(ours) is False  # the same one, replayed after a reconnect

    clock = SystemClock()
    root = create_root_ca(LocalSigner.generate(), "Rogue Root", clock)
    rogue = create_issuing_ca(root, LocalSigner.generate(), "Rogue Issuing", clock)
    forged = build_crl(rogue, [], clock, timedelta(days=1), 2**60).public_bytes(Encoding.PEM)
    assert await keeper.install_crl(forged) is False
    assert await keeper.install_crl(b"-----BEGIN X509 CRL-----\nnope\n") is False
    assert installed.read_bytes() == ours


async def test_a_server_certificate_halfway_through_its_life_is_renewed(
    keeper: BrokerKeeper,
) -> None:
    served = (keeper.broker.run_dir / "server.pem").read_bytes()
    assert await keeper.renew_tls_if_due() is False  # fresh
    assert await keeper.renew_tls_if_due(margin=timedelta(days=365)) is True
    assert (keeper.broker.run_dir / "server.pem").read_bytes() != served


async def test_a_crl_nobody_refreshed_is_re_signed_before_it_lapses(keeper: BrokerKeeper) -> None:
    installed = keeper.broker.run_dir / "crl.pem"
    before = installed.read_bytes()
    assert await keeper.refresh_crl_if_due() is False  # valid for a day
    assert await keeper.refresh_crl_if_due(margin=timedelta(days=2)) is True
    assert installed.read_bytes() != before


class RecordingToken:
    """Stands in for a PKCS#11 session: counts how often it was closed."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


async def test_stopping_closes_the_keys_a_token_session_holds(keeper: BrokerKeeper) -> None:
    # the keeper's gateway is never started, so only the keeper's stop() can log it out
    token = RecordingToken()
    source = keeper._source
    source._keys = replace(source._keys, token=cast(Pkcs11KeyStore, token))
    await keeper.stop()
    assert token.closed == 1
