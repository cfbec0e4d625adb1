"""The bytes a device signs with its current operational key to renew.

    b"fleetgate-renew-v1\\x00"
    || u32be(len(device_id))  || device_id            (UTF-8)
    || u32be(len(request_id)) || request_id           (ASCII)
    || u32be(32)              || sha256(CSR DER)
    || u32be(len(time))       || time                 (decimal ASCII, no sign, no leading zeros)

Length prefixes make the encoding unambiguous; the domain tag keeps a renewal signature from
ever being valid as evidence or as anything else the key signs. Binding the request id and the
CSR digest means a captured signature cannot renew a different key or be replayed with a fresh
request id.
"""

from __future__ import annotations

import hashlib
import struct

RENEWAL_DOMAIN = b"fleetgate-renew-v1\x00"


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def renewal_bytes(device_id: str, request_id: str, csr_der: bytes, time: int) -> bytes:
    if time < 0:
        raise ValueError("time must not be negative")
    return (
        RENEWAL_DOMAIN
        + _field(device_id.encode("utf-8"))
        + _field(request_id.encode("ascii"))
        + _field(hashlib.sha256(csr_der).digest())
        + _field(str(time).encode("ascii"))
    )
