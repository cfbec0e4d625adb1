"""Helpers the gateway tests that start a real gateway share: a home on free ports, whether
Mosquitto can run here, and a device's TLS context issued straight from the gateway's CA."""

from __future__ import annotations

import ssl
import tomllib
from datetime import timedelta
from pathlib import Path

import tomli_w

from gateway.config import CONFIG_NAME
from gateway.home import init_home
from gateway.mosquitto import MosquittoError, find_dynsec_plugin, find_mosquitto
from gateway.service import Gateway
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from simulators.tls import mutual_context


def home_on_free_ports(home: Path) -> Path:
    """A new gateway home whose listeners take any free port."""
    init_home(home)
    config = home / CONFIG_NAME
    data = tomllib.loads(config.read_text())
    data["broker"]["enrollment_port"] = 0
    data["broker"]["operational_port"] = 0
    config.write_text(tomli_w.dumps(data))
    return home


def mosquitto_missing() -> str | None:
    """Why Mosquitto with dynamic security cannot run here, or None when it can."""
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except MosquittoError as exc:
        return str(exc)
    return None


def device_context(gateway: Gateway, name: str) -> ssl.SSLContext:
    """A device certificate of the gateway's issuing CA, as enrollment would give it."""
    key = LocalSigner.generate()
    template = LeafTemplate(
        kind=IdentityKind.DEVICE,
        name=name,
        trust_domain=gateway.settings.trust_domain,
        lifetime=timedelta(hours=1),
    )
    cert = gateway.issuer.issue(template, key.public_key())
    return mutual_context(gateway.ca_chain_pem(), key, cert, (gateway.issuing.certificate,))
