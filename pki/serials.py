"""Certificate serial numbers: 159 random bits, positive and non-zero.

159 bits is the most RFC 5280 allows (20 octets, sign bit clear); the CA/Browser Forum floor
is 64 bits from a CSPRNG. Randomness is injectable so tests can force the edge cases.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from pki.errors import IssuanceError, Reason

__all__ = ["SERIAL_BITS", "new_serial_number"]

SERIAL_BITS = 159
_LIMIT = 1 << SERIAL_BITS
# A zero from a real CSPRNG has odds of 2**-159; more than a few in a row means the injected
# source is broken, and looping for ever would hide that.
_MAX_ATTEMPTS = 8


def new_serial_number(random_bits: Callable[[int], int] = secrets.randbits) -> int:
    for _ in range(_MAX_ATTEMPTS):
        value = random_bits(SERIAL_BITS)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _LIMIT:
            raise IssuanceError(
                Reason.ISSUANCE_FAILED, f"random source returned {value!r} for {SERIAL_BITS} bits"
            )
        if value:
            return value
    raise IssuanceError(Reason.ISSUANCE_FAILED, "random source keeps returning zero serials")
