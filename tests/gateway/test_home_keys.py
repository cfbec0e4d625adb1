"""A running gateway opens the issuing key only: the root CA's key can leave the box."""

from __future__ import annotations

from pathlib import Path

from gateway.config import load_settings
from gateway.home import init_home, load_keys
from gateway.service import Gateway
from gateway.store_memory import MemoryStore


def test_a_gateway_runs_with_the_root_key_moved_off_the_box(tmp_path: Path) -> None:
    result = init_home(tmp_path)
    (tmp_path / "ca" / "root.key").rename(tmp_path / "root.key.offline")
    keys = load_keys(load_settings(tmp_path))
    assert keys.root_certificate == result.root
    assert keys.issuing.certificate == result.issuing
    gateway = Gateway(load_settings(tmp_path), store=MemoryStore(), broker_kind="embedded")
    # devices still get the whole chain up to the root, and the CRL is still signed
    assert gateway.ca_chain_pem().count(b"BEGIN CERTIFICATE") == 2
    assert b"BEGIN X509 CRL" in gateway.crl_pem()
