"""Just enough DER to predict the TBSCertificate we ask a signer to sign.

Issuance validation compares the signed bytes with this prediction instead of parsing the
certificate back into Python objects, which would cost more than all the other checks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from cryptography import x509

_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OBJECT_IDENTIFIER = 0x06
_SEQUENCE = 0x30
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT, constructed: TBSCertificate.extensions
_CRITICAL_TRUE = b"\x01\x01\xff"  # BOOLEAN TRUE; DER omits the FALSE default
VERSION_3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def read_header(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the TLV at ``offset``; ValueError if the
    length runs past the end of ``der``."""
    try:
        tag = der[offset]
        first = der[offset + 1]
        if first < 0x80:
            start, length = offset + 2, first
        else:
            count = first & 0x7F
            start = offset + 2 + count
            length = int.from_bytes(der[offset + 2 : start], "big")
    except IndexError:
        raise ValueError("truncated DER") from None
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def integer(value: int) -> bytes:
    """A non-negative INTEGER (room for the sign bit, no superfluous leading zeros)."""
    return tlv(_INTEGER, value.to_bytes((value.bit_length() + 8) // 8, "big"))


def time(when: datetime) -> bytes:
    """RFC 5280 section 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, seconds, Z."""
    t = when.astimezone(UTC)
    rest = f"{t.month:02d}{t.day:02d}{t.hour:02d}{t.minute:02d}{t.second:02d}Z"
    if 1950 <= t.year <= 2049:
        return tlv(_UTC_TIME, f"{t.year % 100:02d}{rest}".encode("ascii"))
    return tlv(_GENERALIZED_TIME, f"{t.year:04d}{rest}".encode("ascii"))


def validity(not_before: datetime, not_after: datetime) -> bytes:
    return tlv(_SEQUENCE, time(not_before) + time(not_after))


def _base128(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


@lru_cache(maxsize=128)  # a handful of OIDs, encoded for every certificate
def oid(identifier: x509.ObjectIdentifier) -> bytes:
    arcs = [int(arc) for arc in identifier.dotted_string.split(".")]
    body = _base128(40 * arcs[0] + arcs[1]) + b"".join(_base128(arc) for arc in arcs[2:])
    return tlv(_OBJECT_IDENTIFIER, body)


def extension(value: x509.ExtensionType, critical: bool) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }"""
    flag = _CRITICAL_TRUE if critical else b""
    return tlv(_SEQUENCE, oid(value.oid) + flag + tlv(_OCTET_STRING, value.public_bytes()))


def extensions_field(encoded_extensions: bytes) -> bytes:
    """The ``[3] EXPLICIT Extensions`` field (the last one of a v3 TBSCertificate) around
    already encoded extensions."""
    return tlv(_EXTENSIONS_TAG, tlv(_SEQUENCE, encoded_extensions))


def spki_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING contents of a SubjectPublicKeyInfo, without the
    unused-bits octet: what RFC 5280 method 1 hashes into a key identifier."""
    _, content, _ = read_header(spki, 0)
    _, _, algorithm_end = read_header(spki, content)
    tag, bits_start, bits_end = read_header(spki, algorithm_end)
    if tag != _BIT_STRING or spki[bits_start] != 0:
        raise ValueError("not a SubjectPublicKeyInfo with a whole-octet key")
    return spki[bits_start + 1 : bits_end]


def matches_tbs(tbs: bytes, head: bytes, tail: bytes) -> bool:
    """True if TBSCertificate ``tbs`` is exactly ``head``, one AlgorithmIdentifier SEQUENCE
    (the signer's choice, checked by the signature verification), then ``tail``."""
    try:
        tag, content, end = read_header(tbs, 0)
        if tag != _SEQUENCE or end != len(tbs) or not tbs.startswith(head, content):
            return False
        tag, _, algorithm_end = read_header(tbs, content + len(head))
    except ValueError:
        return False
    return tag == _SEQUENCE and tbs[algorithm_end:] == tail
