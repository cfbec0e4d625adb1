"""``fleetgate bench pki``: what issuing through ``pki.Issuer`` costs next to a bare
``CertificateBuilder.sign()`` of the same certificate.

The ratio is the number to watch: both run in the same process, interleaved in rounds, so a
noisy shared machine slows both alike. The gap is the price of building from a template and
validating every certificate before it leaves (one signature check, no chain building).
"""

from __future__ import annotations

import os
import platform
import time
from datetime import timedelta

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.table import Table

from pki.ca import create_issuing_ca, create_root_ca
from pki.clock import Clock, SystemClock
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate

__all__ = ["render_pki_bench", "run_pki_bench"]

_ROUNDS = 10
_WARMUP = 50
_TRUST_DOMAIN = "bench.fleetgate"
_LIFETIME = timedelta(hours=1)
_KEY_TYPE = KeyType.P256
_LEAF_KEY_USAGE = dict(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


class _BareIssuer:
    """The same leaf ``Issuer.issue`` makes, straight through the builder: no template, no
    validation. The baseline the ratio is measured against."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: LocalSigner, clock: Clock) -> None:
        self._ca_cert = ca_cert
        self._ca_key = ca_key.private_key
        self._clock = clock
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def issue(self, name: str, leaf_key: CertificatePublicKeyTypes) -> x509.Certificate:
        now = self._clock.now()
        uri = f"spiffe://{_TRUST_DOMAIN}/{IdentityKind.DEVICE.value}/{name}"
        builder = (
            x509.CertificateBuilder()
            .issuer_name(self._ca_cert.subject)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=60))
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**_LEAF_KEY_USAGE), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
        )
        return builder.sign(self._ca_key, hashes.SHA256())


def run_pki_bench(count: int = 2000, clock: Clock | None = None) -> dict[str, float | int | str]:
    """Issue ``count`` certificates through ``Issuer.issue`` (template, sign, validate) and
    ``count`` equivalent ones through a bare builder, interleaved; report both rates and
    their ratio (pki / bare; 1.0 would mean validation is free)."""
    if not isinstance(count, int) or count < _ROUNDS:
        raise ValueError(f"count must be an int of at least {_ROUNDS}")
    clock = clock if clock is not None else SystemClock()
    root = create_root_ca(LocalSigner.generate(_KEY_TYPE), "Bench Root CA", clock)
    ca_signer = LocalSigner.generate(_KEY_TYPE)
    ca = create_issuing_ca(root, ca_signer, "Bench Issuing CA", clock)
    issuer = Issuer(ca, clock)
    bare = _BareIssuer(ca.certificate, ca_signer, clock)
    # One leaf key for all: key generation is the device's cost, not the issuer's.
    leaf_key = LocalSigner.generate(_KEY_TYPE).public_key()

    def pki_issue(name: str) -> None:
        template = LeafTemplate(IdentityKind.DEVICE, name, _TRUST_DOMAIN, _LIFETIME)
        issuer.issue(template, leaf_key)

    def bare_issue(name: str) -> None:
        bare.issue(name, leaf_key)

    for i in range(_WARMUP):
        pki_issue(f"warm-{i}")
        bare_issue(f"warm-{i}")

    pki_seconds = bare_seconds = 0.0
    per_round = [count // _ROUNDS + (1 if r < count % _ROUNDS else 0) for r in range(_ROUNDS)]
    done = 0
    for n in per_round:
        names = [f"device-{done + i}" for i in range(n)]
        done += n
        start = time.perf_counter()
        for name in names:
            pki_issue(name)
        middle = time.perf_counter()
        for name in names:
            bare_issue(name)
        bare_seconds += time.perf_counter() - middle
        pki_seconds += middle - start

    pki_per_s = count / pki_seconds
    bare_per_s = count / bare_seconds
    return {
        "count": count,
        "pki_per_s": round(pki_per_s, 1),
        "bare_per_s": round(bare_per_s, 1),
        "ratio": round(pki_per_s / bare_per_s, 3),
        "key_type": _KEY_TYPE.value,
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }


def render_pki_bench(result: dict[str, float | int | str]) -> Table:
    table = Table(title="PKI issuance benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("certificates per run", f"{result['count']}"),
        ("Issuer.issue (template, sign, validate)", f"{result['pki_per_s']:,.1f} /s"),
        ("bare CertificateBuilder.sign()", f"{result['bare_per_s']:,.1f} /s"),
        ("ratio (target >= 0.5)", f"{result['ratio']:.3f}"),
        ("key type", str(result["key_type"])),
        ("python", str(result["python"])),
        ("cryptography", str(result["cryptography"])),
        ("machine", str(result["machine"])),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table
