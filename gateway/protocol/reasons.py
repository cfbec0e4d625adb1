"""Reason codes: the stable, snake_case words an ``error`` response carries on the wire.

One enum holds every code a device can receive, including the PKI checks' codes
(``pki.errors.Reason``) so that a CSR or attestation failure reaches the device unchanged.
Each code comes with the advice a device should follow; docs/protocol.md lists both.
"""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    # from pki.errors.Reason: CSR checks
    BAD_ENCODING = "bad_encoding"
    BAD_SIGNATURE = "bad_signature"
    KEY_NOT_ALLOWED = "key_not_allowed"
    FORBIDDEN_KEY = "forbidden_key"
    DUPLICATE_EXTENSION = "duplicate_extension"
    CSR_OVERREACH = "csr_overreach"  # asks for CA powers, another name, an unknown critical ext
    # from pki.errors.Reason: attestation
    UNKNOWN_MANUFACTURER = "unknown_manufacturer"
    CHAIN_INVALID = "chain_invalid"
    BIRTH_CERT_EXPIRED = "birth_cert_expired"
    BIRTH_CERT_NOT_YET_VALID = "birth_cert_not_yet_valid"
    BIRTH_CERT_DENIED = "birth_cert_denied"
    BIRTH_CERT_MALFORMED = "birth_cert_malformed"
    EVIDENCE_SIGNATURE_INVALID = "evidence_signature_invalid"
    DEVICE_ID_MISMATCH = "device_id_mismatch"  # birth serial number is not the topic's device id
    # from pki.errors.Reason: the CA and its keys
    ISSUANCE_FAILED = "issuance_failed"
    WRONG_PASSPHRASE = "wrong_passphrase"
    KEY_NOT_FOUND = "key_not_found"
    KEY_EXISTS = "key_exists"
    # the wire format
    MALFORMED = "malformed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    REQUEST_ID_REUSED = "request_id_reused"
    # nonces and tokens
    NONCE_UNKNOWN = "nonce_unknown"
    NONCE_EXPIRED = "nonce_expired"
    NONCE_REUSED = "nonce_reused"
    NONCE_OTHER_DEVICE = "nonce_other_device"
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_REUSED = "token_reused"
    TOKEN_OTHER_DEVICE = "token_other_device"
    # policy and registry
    FIRMWARE_NOT_ALLOWED = "firmware_not_allowed"
    IDENTITY_CONFLICT = "identity_conflict"
    CLOCK_SKEW = "clock_skew"
    NOT_ENROLLED = "not_enrolled"
    RENEWAL_SIGNATURE_INVALID = "renewal_signature_invalid"
    KEY_REUSED = "key_reused"
    DEVICE_QUARANTINED = "device_quarantined"
    DEVICE_REVOKED = "device_revoked"
    REATTESTATION_REQUIRED = "reattestation_required"
    CERTIFICATE_EXPIRED = "certificate_expired"
    # the gateway itself
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"  # too many requests from this device, or from everyone


class Advice(StrEnum):
    """What a device does after an ``error`` response."""

    RETRY = "retry"  # send the very same request again (same id, same bytes) after a delay
    RESTART = "restart"  # after a delay, a new attempt: new request id, new key, fresh hello
    REATTEST = "reattest"  # the operational certificate is no good: enroll again from hello now
    GIVE_UP = "give_up"  # nothing the device can do alone changes the answer


_ADVICE: dict[ReasonCode, Advice] = {
    ReasonCode.BAD_ENCODING: Advice.GIVE_UP,
    ReasonCode.BAD_SIGNATURE: Advice.GIVE_UP,
    ReasonCode.KEY_NOT_ALLOWED: Advice.GIVE_UP,
    ReasonCode.FORBIDDEN_KEY: Advice.RESTART,
    ReasonCode.DUPLICATE_EXTENSION: Advice.GIVE_UP,
    ReasonCode.CSR_OVERREACH: Advice.GIVE_UP,
    ReasonCode.UNKNOWN_MANUFACTURER: Advice.GIVE_UP,
    ReasonCode.CHAIN_INVALID: Advice.GIVE_UP,
    ReasonCode.BIRTH_CERT_EXPIRED: Advice.GIVE_UP,
    # The gateway's clock may be behind a freshly minted certificate: worth a later attempt.
    ReasonCode.BIRTH_CERT_NOT_YET_VALID: Advice.RESTART,
    ReasonCode.BIRTH_CERT_DENIED: Advice.GIVE_UP,
    ReasonCode.BIRTH_CERT_MALFORMED: Advice.GIVE_UP,
    ReasonCode.EVIDENCE_SIGNATURE_INVALID: Advice.GIVE_UP,
    ReasonCode.DEVICE_ID_MISMATCH: Advice.GIVE_UP,
    ReasonCode.ISSUANCE_FAILED: Advice.RESTART,
    ReasonCode.WRONG_PASSPHRASE: Advice.RESTART,
    ReasonCode.KEY_NOT_FOUND: Advice.RESTART,
    ReasonCode.KEY_EXISTS: Advice.RESTART,
    ReasonCode.MALFORMED: Advice.GIVE_UP,
    ReasonCode.PAYLOAD_TOO_LARGE: Advice.GIVE_UP,
    ReasonCode.UNSUPPORTED_VERSION: Advice.GIVE_UP,
    ReasonCode.UNKNOWN_TYPE: Advice.GIVE_UP,
    ReasonCode.INVALID_FIELD: Advice.GIVE_UP,
    ReasonCode.REQUEST_ID_REUSED: Advice.RESTART,
    ReasonCode.NONCE_UNKNOWN: Advice.RESTART,
    ReasonCode.NONCE_EXPIRED: Advice.RESTART,
    ReasonCode.NONCE_REUSED: Advice.RESTART,
    ReasonCode.NONCE_OTHER_DEVICE: Advice.RESTART,
    ReasonCode.TOKEN_UNKNOWN: Advice.GIVE_UP,
    ReasonCode.TOKEN_EXPIRED: Advice.GIVE_UP,
    ReasonCode.TOKEN_REUSED: Advice.GIVE_UP,
    ReasonCode.TOKEN_OTHER_DEVICE: Advice.GIVE_UP,
    ReasonCode.FIRMWARE_NOT_ALLOWED: Advice.GIVE_UP,
    ReasonCode.IDENTITY_CONFLICT: Advice.GIVE_UP,
    ReasonCode.CLOCK_SKEW: Advice.RESTART,
    ReasonCode.NOT_ENROLLED: Advice.REATTEST,
    ReasonCode.RENEWAL_SIGNATURE_INVALID: Advice.REATTEST,
    ReasonCode.KEY_REUSED: Advice.RESTART,
    # Quarantine can be lifted by an operator; a device keeps asking, slowly.
    ReasonCode.DEVICE_QUARANTINED: Advice.RESTART,
    ReasonCode.DEVICE_REVOKED: Advice.GIVE_UP,
    ReasonCode.REATTESTATION_REQUIRED: Advice.REATTEST,
    ReasonCode.CERTIFICATE_EXPIRED: Advice.REATTEST,
    ReasonCode.UNAVAILABLE: Advice.RETRY,
    ReasonCode.RATE_LIMITED: Advice.RETRY,
}


def advice_for(reason: str) -> Advice:
    """The advice for a reason code; a code this version does not know means "try later"
    (a newer gateway may send codes an older device has never heard of)."""
    try:
        return _ADVICE[ReasonCode(reason)]
    except ValueError:
        return Advice.RESTART
