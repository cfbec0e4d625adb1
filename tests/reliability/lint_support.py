"""pkilint's RFC 5280 lints as the reliability tests run them: ``lint`` for one certificate,
``lint_chain`` for an issuer and a certificate it signed, ``lint_crl`` for a CRL. Each returns
the real problems found (an empty list when there are none).

Two findings are known false positives and are checked by other means instead:

- ``pkix.invalid_uri_syntax`` on our SPIFFE ids: pkilint delegates URIs to the ``validators``
  package, which accepts only the http, https and ftp schemes; a ``spiffe://`` URI is a valid
  RFC 3986 URI, and ``pki.profile.parse_spiffe_id`` checks it here.
- ``pkix.invalid_domain_name_syntax`` on ``localhost``: ``validators.domain`` demands a TLD,
  but a single-label name is valid DNS syntax (RFC 1034 section 3.5); the broker's certificate
  names ``localhost`` because devices on the edge box connect to it by that name.

INFO findings (pkilint identifying how a key identifier was computed) are not problems.

Import this module only once pkilint is known to be installed (``pytest.importorskip``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkilint import loader, validation
from pkilint.bin import lint_pkix_signer_signee_cert_chain as chain_lint
from pkilint.pkix import (
    certificate,
    create_attribute_decoder,
    create_extension_decoder,
    crl,
    extension,
    name,
)

from pki.profile import parse_spiffe_id

Severity = validation.ValidationFindingSeverity


@dataclass(frozen=True)
class Finding:
    code: str
    severity: validation.ValidationFindingSeverity
    message: str | None
    path: str


def _certificate_linter() -> validation.ValidatorContainer:
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def _crl_linter() -> validation.ValidatorContainer:
    return crl.create_pkix_crl_validator_container(
        [
            create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )


CERTIFICATE_LINTER = _certificate_linter()
CRL_LINTER = _crl_linter()


def findings_of(results: list[validation.ValidationResult]) -> list[Finding]:
    return [
        Finding(d.finding.code, d.finding.severity, d.message, str(r.node.path))
        for r in results
        for d in r.finding_descriptions
    ]


def problems(found: list[Finding]) -> list[Finding]:
    """Findings that are real: everything above INFO but the two documented false positives,
    each re-checked by a stricter test of ours."""
    real = []
    for finding in found:
        if finding.severity is Severity.INFO:
            continue
        value = (finding.message or "").split('"')[1] if '"' in (finding.message or "") else ""
        if finding.code == "pkix.invalid_uri_syntax" and value.startswith("spiffe://"):
            parse_spiffe_id(value)  # raises if it is not one of ours
            continue
        if finding.code == "pkix.invalid_domain_name_syntax" and value == "localhost":
            continue
        real.append(finding)
    return real


def lint(cert: x509.Certificate) -> list[Finding]:
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        cert.public_bytes(Encoding.DER), "certificate"
    )
    return problems(findings_of(CERTIFICATE_LINTER.validate(document.root)))


def lint_chain(issuer: x509.Certificate, subject: x509.Certificate) -> list[Finding]:
    documents: dict[str, object] = {}
    certificates = loader.RFC5280CertificateDocumentLoader()
    for label, cert in (("issuer", issuer), ("subject", subject)):
        documents[label] = certificates.load_der_document(
            cert.public_bytes(Encoding.DER), label, label, documents
        )
    issuer_doc, subject_doc = documents["issuer"], documents["subject"]
    results = chain_lint.create_decoder_validation_container().validate(issuer_doc.root)  # type: ignore[attr-defined]
    results += chain_lint.create_decoder_validation_container().validate(subject_doc.root)  # type: ignore[attr-defined]
    results += chain_lint.create_issuer_validation_container().validate(issuer_doc.root)  # type: ignore[attr-defined]
    results += chain_lint.create_subject_validation_container().validate(subject_doc.root)  # type: ignore[attr-defined]
    return problems(findings_of(results))


def lint_crl(revocation_list: x509.CertificateRevocationList) -> list[Finding]:
    document = loader.RFC5280CertificateListDocumentLoader().load_der_document(
        revocation_list.public_bytes(Encoding.DER), "crl"
    )
    return problems(findings_of(CRL_LINTER.validate(document.root)))
