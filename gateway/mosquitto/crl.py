"""Keeping Mosquitto's CRL valid: a CRL whose nextUpdate has passed makes Mosquitto refuse
every client certificate, revoked or not, so the CRL is re-signed well before that."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from pki.clock import Clock, require_aware

__all__ = ["CrlKeeper", "CrlPublisher", "check_crl", "needs_refresh"]

log = logging.getLogger(__name__)


class CrlPublisher(Protocol):
    async def publish_crl(self, crl_pem: bytes) -> None: ...


def check_crl(crl_pem: bytes, now: datetime) -> x509.CertificateRevocationList:
    """The parsed CRL; MosquittoError(INVALID_CRL) if it is not one PEM CRL with a
    nextUpdate, MosquittoError(CRL_EXPIRED) if that nextUpdate is not after ``now``."""
    if not isinstance(crl_pem, bytes):
        raise TypeError(f"crl_pem must be bytes, not {type(crl_pem).__name__}")
    now = require_aware(now, "now")
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise MosquittoError(MosquittoReason.INVALID_CRL, f"not a PEM CRL: {exc}") from None
    next_update = crl.next_update_utc
    if next_update is None:
        raise MosquittoError(MosquittoReason.INVALID_CRL, "CRL has no nextUpdate")
    if next_update <= now:
        raise MosquittoError(
            MosquittoReason.CRL_EXPIRED,
            f"nextUpdate {next_update.isoformat()} is not after {now.isoformat()}",
        )
    return crl


def needs_refresh(crl_pem: bytes | None, now: datetime, margin: timedelta) -> bool:
    """True when there is no CRL yet, it does not parse, or its nextUpdate is within
    ``margin`` of ``now``."""
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise ValueError("margin must be a non-negative timedelta")
    if crl_pem is None:
        return True
    try:
        crl = check_crl(crl_pem, now)
    except MosquittoError:
        return True
    next_update = crl.next_update_utc
    return next_update is None or next_update - now <= margin


class CrlKeeper:
    """Re-publishes a freshly built CRL when the current one nears its nextUpdate.

    ``build`` returns a new PEM CRL (the gateway's ``crl_pem``); it runs in a thread, since
    signing a large CRL takes a while. Call ``refresh()`` after every revocation (``force``)
    and let ``run()`` cover expiry.
    """

    def __init__(
        self,
        broker: CrlPublisher,
        build: Callable[[], bytes],
        clock: Clock,
        *,
        margin: timedelta = timedelta(minutes=30),
    ) -> None:
        if not callable(build):
            raise TypeError("build must be callable")
        if not isinstance(margin, timedelta) or margin < timedelta(0):
            raise ValueError("margin must be a non-negative timedelta")
        self._broker = broker
        self._build = build
        self._clock = clock
        self._margin = margin
        self._current: bytes | None = None

    @property
    def current(self) -> bytes | None:
        return self._current

    async def refresh(self, *, force: bool = False) -> bool:
        """Publish a new CRL if forced or due; True when one was published."""
        if not force and not needs_refresh(self._current, self._clock.now(), self._margin):
            return False
        crl_pem = await asyncio.to_thread(self._build)
        await self._broker.publish_crl(crl_pem)
        self._current = crl_pem
        return True

    async def run(self, interval: float = 60.0) -> None:
        """Check every ``interval`` seconds until cancelled; a failure is logged and retried
        at the next check, never fatal."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("could not refresh the broker's CRL")
            await asyncio.sleep(interval)
