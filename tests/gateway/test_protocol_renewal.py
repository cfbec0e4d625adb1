"""The renewal signature's bytes, byte for byte as docs/protocol.md states them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.protocol import RENEWAL_DOMAIN, renewal_bytes
from pki.attestation import EvidenceClaims


def test_layout_is_domain_then_length_prefixed_fields() -> None:
    csr = b"\x30\x03\x02\x01\x00"
    data = renewal_bytes("sn-1", "r7", csr, 1767225600)
    expected = (
        b"fleetgate-renew-v1\x00"
        + b"\x00\x00\x00\x04sn-1"
        + b"\x00\x00\x00\x02r7"
        + b"\x00\x00\x00\x20"
        + hashlib.sha256(csr).digest()
        + b"\x00\x00\x00\x0a1767225600"
    )
    assert data == expected
    assert data.startswith(RENEWAL_DOMAIN)


def test_every_field_changes_the_bytes() -> None:
    base = renewal_bytes("sn-1", "r1", b"csr", 10)
    assert base != renewal_bytes("sn-2", "r1", b"csr", 10)
    assert base != renewal_bytes("sn-1", "r2", b"csr", 10)
    assert base != renewal_bytes("sn-1", "r1", b"csr2", 10)
    assert base != renewal_bytes("sn-1", "r1", b"csr", 11)
    # Length prefixes: moving a character from one field to the next is a different message.
    assert renewal_bytes("ab", "c", b"x", 1) != renewal_bytes("a", "bc", b"x", 1)


def test_negative_time_is_refused() -> None:
    with pytest.raises(ValueError):
        renewal_bytes("sn-1", "r1", b"csr", -1)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_the_documented_test_vectors_hold() -> None:
    text = DOCS.read_text()
    csr = bytes.fromhex("3003020100")
    renewal = renewal_bytes("sn-0001", "r-42", csr, 1767225600)
    block = text.split("The 88 renewal bytes are, in hex:")[1].split("```")[1]
    assert bytes.fromhex("".join(block.split())) == renewal
    assert len(renewal) == 88
    claims = EvidenceClaims(
        device_id="sn-0001",
        gateway_nonce=bytes(range(32)),
        device_nonce=bytes(range(32, 48)),
        csr_digest=hashlib.sha256(csr).digest(),
        firmware_version="1.4.2",
        firmware_digest=hashlib.sha256(b"firmware").hexdigest(),
    )
    evidence = claims.to_bytes()
    assert f"evidence bytes are {len(evidence)} bytes long" in text
    assert f"their SHA-256 is `{hashlib.sha256(evidence).hexdigest()}`" in text
