"""Fleetgate's pure PKI core: CAs, issuance, CSR checks, CRLs, birth certificates and
attestation. No files, sockets or database; time comes from an injected ``Clock``."""

from pki.attestation import (
    AttestationVerdict,
    BirthIdentity,
    EvidenceClaims,
    read_birth_identity,
    sign_evidence,
    verify_attestation,
)
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import Clock, FakeClock, SystemClock
from pki.crl import RevokedEntry, build_crl
from pki.csr import (
    CheckedCsr,
    CsrPolicy,
    certificate_fingerprint,
    check_csr,
    make_csr,
    public_key_fingerprint,
)
from pki.errors import CsrRejected, IssuanceError, KeyStoreError, PkiError, Reason
from pki.factory import BirthCredential, FactoryCA
from pki.issue import Issuer, validate_issued
from pki.keys import (
    KeyStore,
    KeyType,
    LocalSigner,
    MemoryKeyStore,
    Signer,
    decrypt_private_key,
    encrypt_private_key,
    verify_signature,
)
from pki.profile import (
    IDENTITY_NAME_PATTERN,
    IdentityKind,
    LeafTemplate,
    check_identity_name,
    check_trust_domain,
    is_identity_name,
    parse_spiffe_id,
    spiffe_id,
)
from pki.serials import new_serial_number

__all__ = [
    "IDENTITY_NAME_PATTERN",
    "AttestationVerdict",
    "BirthCredential",
    "BirthIdentity",
    "CertificateAuthority",
    "CheckedCsr",
    "Clock",
    "CsrPolicy",
    "CsrRejected",
    "EvidenceClaims",
    "FactoryCA",
    "FakeClock",
    "IdentityKind",
    "IssuanceError",
    "Issuer",
    "KeyStore",
    "KeyStoreError",
    "KeyType",
    "LeafTemplate",
    "LocalSigner",
    "MemoryKeyStore",
    "PkiError",
    "Reason",
    "RevokedEntry",
    "Signer",
    "SystemClock",
    "build_crl",
    "certificate_fingerprint",
    "check_csr",
    "check_identity_name",
    "check_trust_domain",
    "create_issuing_ca",
    "create_root_ca",
    "decrypt_private_key",
    "encrypt_private_key",
    "is_identity_name",
    "make_csr",
    "new_serial_number",
    "parse_spiffe_id",
    "public_key_fingerprint",
    "read_birth_identity",
    "sign_evidence",
    "spiffe_id",
    "validate_issued",
    "verify_attestation",
    "verify_signature",
]
