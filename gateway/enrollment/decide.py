"""The decisions of enrollment, one method per request type.

Each method checks a request against the registry, the policy and the PKI, consumes what must be
single-use (nonce, token), signs a certificate if one is due, and returns a ``Decision`` for the
service to commit. Nothing here publishes; a refusal is an ``EnrollmentRejected``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway.enrollment.errors import EnrollmentRejected
from gateway.enrollment.issuance import issue_device_certificate
from gateway.enrollment.policy import EnrollmentPolicy
from gateway.enrollment.timing import clock_skew, unix
from gateway.enrollment.tokens import token_hash
from gateway.faults import fault_point
from gateway.protocol.messages import (
    Challenge,
    Enroll,
    Firmware,
    Hello,
    IssuedCertificate,
    Pending,
    Renew,
    TokenEnroll,
)
from gateway.protocol.reasons import ReasonCode
from gateway.protocol.renewal import renewal_bytes
from gateway.store import (
    AuditEntry,
    CertificateRecord,
    CertificateStatus,
    IdentityRecord,
    IdentityState,
    NonceCheck,
    NonceRecord,
    Store,
    TokenCheck,
)
from pki.attestation import BirthIdentity, EvidenceClaims, read_birth_identity, verify_attestation
from pki.csr import CheckedCsr, CsrIdentity, CsrPolicy, check_csr
from pki.errors import PkiError, Reason
from pki.issue import Issuer
from pki.keys import verify_signature
from pki.profile import IdentityKind

NONCE_BYTES = 32


@dataclass(frozen=True)
class Decision:
    """What to commit and answer. ``outcome`` is the stored response's outcome."""

    response: Challenge | IssuedCertificate | Pending
    outcome: str  # challenge | issued | pending
    metric: str
    identity: IdentityRecord | None = None
    certificate: CertificateRecord | None = None
    audit: tuple[AuditEntry, ...] = ()
    nonce: NonceRecord | None = None  # a challenge's, stored with it


@dataclass
class Attempt:
    """One evaluation of one request.

    ``resumed``: an earlier evaluation of this very request (same device, id and bytes)
    already passed the time check and consumed its nonce or token; either its answer was
    ``pending`` and it is retried, or its commit failed after the consumption. Consuming
    again would refuse the device for the gateway's own failure. ``consumed`` is set when this
    evaluation consumes.
    """

    resumed: bool = False
    consumed: bool = False


def from_pki(reason: Reason) -> ReasonCode:
    return ReasonCode(reason.value)


def _actor(device_id: str) -> str:
    return f"device:{device_id}"


def _load_chain(ders: tuple[bytes, ...]) -> tuple[x509.Certificate, ...]:
    certificates = []
    for index, der in enumerate(ders):
        try:
            certificates.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            code = ReasonCode.BIRTH_CERT_MALFORMED if index == 0 else ReasonCode.CHAIN_INVALID
            raise EnrollmentRejected(code, f"chain[{index}] is not a DER certificate") from exc
    return tuple(certificates)


def _birth_identity(chain: tuple[x509.Certificate, ...]) -> BirthIdentity:
    try:
        return read_birth_identity(chain[0])
    except PkiError as exc:
        raise EnrollmentRejected(from_pki(exc.reason), exc.detail) from None


def _check_registry(existing: IdentityRecord | None, birth_fingerprint: str | None) -> None:
    """Refuse what the registry already decided: another kind or another birth certificate
    under this name, a revoked or a quarantined device."""
    if existing is None:
        return
    if existing.kind is not IdentityKind.DEVICE:
        raise EnrollmentRejected(
            ReasonCode.IDENTITY_CONFLICT, f"{existing.id} is a {existing.kind} identity"
        )
    if existing.state is IdentityState.REVOKED:
        raise EnrollmentRejected(ReasonCode.DEVICE_REVOKED, f"{existing.id} is revoked")
    if (
        birth_fingerprint is not None
        and existing.birth_fingerprint is not None
        and existing.birth_fingerprint != birth_fingerprint
    ):
        raise EnrollmentRejected(
            ReasonCode.IDENTITY_CONFLICT,
            f"{existing.id} is bound to another birth certificate",
        )
    if existing.state is IdentityState.QUARANTINED:
        raise EnrollmentRejected(ReasonCode.DEVICE_QUARANTINED, f"{existing.id} is quarantined")


class Decider:
    def __init__(
        self,
        store: Store,
        issuer: Issuer,
        policy: EnrollmentPolicy,
        *,
        csr_policy: CsrPolicy,
        random_bytes: Callable[[int], bytes],
        rng: random.Random,
        lifetime_cap: Callable[[str], int | None] | None = None,
    ) -> None:
        """``lifetime_cap(device_id)``: seconds a device's next certificate may last at most
        (an automatic response to suspicious behaviour); None leaves the policy's."""
        self._store = store
        self._lifetime_cap = lifetime_cap
        self._issuer = issuer
        self._policy = policy
        self._csr_policy = csr_policy
        self._random_bytes = random_bytes
        self._rng = rng

    def replace_policy(self, policy: EnrollmentPolicy) -> None:
        """Judge the next requests by ``policy``; requests in progress keep the one they read."""
        self._policy = policy

    # shared checks

    def _check_time(self, device_time: int, now: datetime) -> None:
        skew = clock_skew(device_time, now)
        if skew > self._policy.max_clock_skew:
            raise EnrollmentRejected(
                ReasonCode.CLOCK_SKEW,
                f"device time is {int(skew.total_seconds())} s from the gateway's "
                f"(at most {int(self._policy.max_clock_skew.total_seconds())} s)",
            )

    def _check_csr(
        self, device_id: str, csr: bytes, forbidden: tuple[CertificatePublicKeyTypes, ...] = ()
    ) -> CheckedCsr:
        # A device's CSR may name the device, and no one else. Both parts were checked
        # already (the policy's trust domain, the topic's device id), as LeafTemplate.spiffe_id
        # relies on too: formatted, not validated again on every request.
        identity = CsrIdentity(
            common_name=device_id,
            spiffe_id=f"spiffe://{self._policy.trust_domain}/{IdentityKind.DEVICE.value}/{device_id}",
        )
        try:
            checked = check_csr(
                csr, self._csr_policy, forbidden_keys=forbidden, identity=identity
            )
        except PkiError as exc:
            raise EnrollmentRejected(from_pki(exc.reason), exc.detail) from None
        if self._store.key_fingerprint_used(checked.key_fingerprint):
            raise EnrollmentRejected(
                ReasonCode.KEY_REUSED, "this key was certified before; generate a new one"
            )
        return checked

    def _check_firmware(self, model: str | None, firmware: Firmware | None) -> None:
        digest = firmware.digest if firmware is not None else None
        if not self._policy.firmware_allowed(model, digest):
            raise EnrollmentRejected(
                ReasonCode.FIRMWARE_NOT_ALLOWED,
                f"firmware {digest or '(not reported)'} is not allowed for model {model!r}",
            )

    def _issue(
        self,
        identity: IdentityRecord,
        csr: CheckedCsr,
        request_id: str,
        now: datetime,
        *,
        action: str,
        metric: str,
        detail: dict[str, str],
        requested_lifetime: int | None,
    ) -> Decision:
        cap = self._lifetime_cap(identity.id) if self._lifetime_cap is not None else None
        if cap is not None:
            requested_lifetime = cap if requested_lifetime is None else min(requested_lifetime, cap)
            detail = {**detail, "lifetime_cap": str(cap)}
        issued = issue_device_certificate(
            self._issuer,
            self._policy,
            self._rng,
            device_id=identity.id,
            public_key=csr.public_key,
            key_fingerprint=csr.key_fingerprint,
            request_id=request_id,
            now=now,
            requested_lifetime=requested_lifetime,
        )
        fault_point("after_signing")
        if requested_lifetime is not None:
            detail = {
                **detail,
                "requested_lifetime": str(requested_lifetime),
                "lifetime": str(int(issued.lifetime.total_seconds())),
            }
        entry = AuditEntry(
            actor=_actor(identity.id),
            action=action,
            subject=identity.id,
            outcome="ok",
            at=now,
            detail={
                "request_id": request_id,
                "serial": f"{issued.record.serial:x}",
                "not_after": issued.record.not_after.isoformat(),
                "key": csr.key_fingerprint,
                **detail,
            },
        )
        return Decision(
            response=issued.response,
            outcome="issued",
            metric=metric,
            identity=identity,
            certificate=issued.record,
            audit=(entry,),
        )

    # hello: chain sanity, then a nonce bound to this device

    def hello(self, device_id: str, request: Hello, now: datetime) -> Decision:
        chain = _load_chain(request.chain)
        birth = _birth_identity(chain)
        if birth.serial_number != device_id:
            raise EnrollmentRejected(
                ReasonCode.DEVICE_ID_MISMATCH,
                f"birth certificate is for {birth.serial_number!r}, not {device_id!r}",
            )
        self._check_chain(chain, device_id, now)
        _check_registry(self._store.get_identity(device_id), birth.fingerprint)
        nonce = self._random_bytes(NONCE_BYTES)
        expires_at = now + self._policy.nonce_ttl
        fault_point("after_nonce_issued")
        # stored with the challenge, in one transaction (``Store.record_outcome``)
        return Decision(
            response=Challenge(id=request.id, nonce=nonce, expires_at=unix(expires_at)),
            outcome="challenge",
            metric="challenges",
            nonce=NonceRecord(nonce, device_id, issued_at=now, expires_at=expires_at),
        )

    def _check_chain(
        self, chain: tuple[x509.Certificate, ...], device_id: str, now: datetime
    ) -> None:
        # pki appraises chain and evidence together; at hello there is no evidence yet, so
        # appraise placeholder claims and set aside the (certain) signature failure. This
        # keeps nonces from being handed to chains the enroll step would refuse anyway.
        placeholder = EvidenceClaims(
            device_id=device_id,
            gateway_nonce=bytes(NONCE_BYTES),
            device_nonce=bytes(NONCE_BYTES),
            csr_digest=bytes(32),
            firmware_version="0",
            firmware_digest="0" * 64,
        )
        verdict = verify_attestation(
            chain,
            placeholder,
            b"",
            trusted_roots=self._policy.trusted_roots,
            denied_fingerprints=self._policy.denied_birth_fingerprints,
            now=now,
        )
        reasons = [r for r in verdict.reasons if r is not Reason.EVIDENCE_SIGNATURE_INVALID]
        if reasons:
            raise EnrollmentRejected(from_pki(reasons[0]), "birth certificate chain refused")

    # enroll: attested CSR

    def enroll(
        self, device_id: str, request: Enroll, now: datetime, attempt: Attempt
    ) -> Decision:
        """A resumed attempt skips the time check and the nonce; everything else is judged
        again, now (the device may have been revoked or approved meanwhile)."""
        if not attempt.resumed:
            self._check_time(request.time, now)
        chain = _load_chain(request.chain)
        birth = _birth_identity(chain)
        csr = self._check_csr(device_id, request.csr, forbidden=(birth.public_key,))
        if not attempt.resumed:
            check = self._store.consume_nonce(request.nonce, device_id, now)
            if check is not NonceCheck.OK:
                raise EnrollmentRejected(ReasonCode(check.value), "ask for a new challenge")
            attempt.consumed = True
        claims = EvidenceClaims(
            device_id=device_id,
            gateway_nonce=request.nonce,
            device_nonce=request.device_nonce,
            csr_digest=csr.digest,
            firmware_version=request.firmware.version,
            firmware_digest=request.firmware.digest,
        )
        verdict = verify_attestation(
            chain,
            claims,
            request.evidence,
            trusted_roots=self._policy.trusted_roots,
            denied_fingerprints=self._policy.denied_birth_fingerprints,
            now=now,
        )
        if not verdict.ok:
            raise EnrollmentRejected(
                from_pki(verdict.reasons[0]),
                "attestation failed: " + ", ".join(r.value for r in verdict.reasons),
            )
        fault_point("after_csr_verified")
        existing = self._store.get_identity(device_id)
        _check_registry(existing, birth.fingerprint)
        self._check_firmware(birth.model, request.firmware)

        by_policy = self._policy.approves(birth.manufacturer, birth.model)
        already_active = existing is not None and existing.state is IdentityState.ACTIVE
        approved = already_active or by_policy
        identity = IdentityRecord(
            id=device_id,
            kind=IdentityKind.DEVICE,
            state=IdentityState.ACTIVE if approved else IdentityState.PENDING,
            created_at=existing.created_at if existing is not None else now,
            updated_at=now,
            manufacturer=birth.manufacturer,
            model=birth.model,
            firmware_version=request.firmware.version,
            firmware_digest=request.firmware.digest,
            birth_fingerprint=birth.fingerprint,
            role=None,
            last_seen_at=now,
            reattest_required=False if approved else bool(existing and existing.reattest_required),
        )
        facts = {
            "birth_fingerprint": birth.fingerprint,
            "manufacturer": birth.manufacturer,
            "model": birth.model,
            "firmware_version": request.firmware.version,
            "firmware_digest": request.firmware.digest,
        }
        if not approved:
            entry = AuditEntry(
                actor=_actor(device_id),
                action="enroll",
                subject=device_id,
                outcome="pending",
                at=now,
                detail={"request_id": request.id, **facts},
            )
            return Decision(
                response=Pending(id=request.id, retry_after=self._policy.pending_retry_after),
                outcome="pending",
                metric="pending",
                identity=identity,
                audit=(entry,),
            )
        # "registry": an operator approved it, or it enrolled before and re-attests now.
        approval = "registry" if already_active else "policy"
        return self._issue(
            identity,
            csr,
            request.id,
            now,
            action="enroll",
            metric="issued",
            detail={**facts, "method": "attestation", "approval": approval},
            requested_lifetime=request.lifetime,
        )

    # token_enroll: a one-time token stands in for attestation and approval

    def token_enroll(
        self, device_id: str, request: TokenEnroll, now: datetime, attempt: Attempt
    ) -> Decision:
        if not attempt.resumed:
            self._check_time(request.time, now)
        csr = self._check_csr(device_id, request.csr)
        existing = self._store.get_identity(device_id)
        _check_registry(existing, None)
        self._check_firmware(existing.model if existing else None, request.firmware)
        if not attempt.resumed:
            # Consumed last, after every check that could refuse: a token is not burnt by a
            # request that would have been refused anyway.
            check = self._store.consume_token(token_hash(request.token), device_id, now)
            if check is not TokenCheck.OK:
                raise EnrollmentRejected(ReasonCode(check.value), "ask an operator for a new token")
            attempt.consumed = True
        fault_point("after_csr_verified")
        firmware = request.firmware
        base = existing or IdentityRecord(
            id=device_id,
            kind=IdentityKind.DEVICE,
            state=IdentityState.ACTIVE,
            created_at=now,
            updated_at=now,
        )
        identity = dataclasses.replace(
            base,
            state=IdentityState.ACTIVE,
            updated_at=now,
            last_seen_at=now,
            firmware_version=firmware.version if firmware else base.firmware_version,
            firmware_digest=firmware.digest if firmware else base.firmware_digest,
            reattest_required=False,
        )
        return self._issue(
            identity,
            csr,
            request.id,
            now,
            action="enroll",
            metric="issued",
            detail={"method": "token", "approval": "token"},
            requested_lifetime=request.lifetime,
        )

    # renew: proven by the current operational key

    def renew(self, device_id: str, request: Renew, now: datetime) -> Decision:
        self._check_time(request.time, now)
        identity = self._store.get_identity(device_id)
        if identity is None or identity.kind is not IdentityKind.DEVICE:
            raise EnrollmentRejected(ReasonCode.NOT_ENROLLED, f"no device {device_id!r}")
        if identity.state is IdentityState.REVOKED:
            raise EnrollmentRejected(ReasonCode.DEVICE_REVOKED, f"{device_id} is revoked")
        if identity.state is IdentityState.QUARANTINED:
            raise EnrollmentRejected(ReasonCode.DEVICE_QUARANTINED, f"{device_id} is quarantined")
        if identity.state is not IdentityState.ACTIVE:
            raise EnrollmentRejected(ReasonCode.NOT_ENROLLED, f"{device_id} is {identity.state}")
        current = max(
            (
                c
                for c in self._store.certificates_for(device_id)
                if c.status is CertificateStatus.ACTIVE
            ),
            key=lambda c: (c.issued_at, c.not_after),
            default=None,
        )
        if current is None:
            raise EnrollmentRejected(ReasonCode.NOT_ENROLLED, "no active certificate")
        if now >= current.not_after:
            raise EnrollmentRejected(
                ReasonCode.CERTIFICATE_EXPIRED,
                f"certificate expired at {current.not_after.isoformat()}; enroll again",
            )
        current_key = x509.load_pem_x509_certificate(current.pem.encode("ascii")).public_key()
        signed = renewal_bytes(device_id, request.id, request.csr, request.time)
        if not verify_signature(current_key, request.signature, signed):
            raise EnrollmentRejected(
                ReasonCode.RENEWAL_SIGNATURE_INVALID,
                f"signature does not verify with the key of certificate {current.serial:x}",
            )
        if identity.reattest_required:
            raise EnrollmentRejected(
                ReasonCode.REATTESTATION_REQUIRED, "an operator asked this device to re-attest"
            )
        csr = self._check_csr(device_id, request.csr)
        fault_point("after_csr_verified")
        firmware = request.firmware
        if firmware is not None:
            # Optional at renewal: the firmware was judged at enrollment; a report of a new
            # image is judged again.
            self._check_firmware(identity.model, firmware)
        renewed = dataclasses.replace(
            identity,
            updated_at=now,
            last_seen_at=now,
            firmware_version=firmware.version if firmware else identity.firmware_version,
            firmware_digest=firmware.digest if firmware else identity.firmware_digest,
        )
        return self._issue(
            renewed,
            csr,
            request.id,
            now,
            action="renew",
            metric="renewed",
            detail={"previous_serial": f"{current.serial:x}"},
            requested_lifetime=request.lifetime,
        )
