"""Retention: stored answers and nonces are deleted once the protocol has no use for them.

Every answered request leaves its stored answer (about 2 kB for a certificate) and every hello
a nonce (129 bytes); a device on 60 s certificates renews about 2,160 times a day, which kept
for ever is 4.4 MB a day per device. What the protocol needs of them (docs/protocol.md, section
7, "How long answers are kept"):

- an answer, while the device may still send the same request again: the retry horizon
  (``RETRY_HORIZON``, one hour). That is more than ten of the longest waits between two copies
  of one request (300 s, +10%), at least the longest nonce lifetime (``nonce_ttl`` is at most an
  hour) and the default certificate lifetime. A copy arriving later is judged afresh, which
  never issues a second certificate for it: its key was certified (``key_reused``), its nonce
  used (``nonce_reused``) or its ``time`` is old (``clock_skew``), all "restart" codes;
- a ``pending`` answer, while the device waits for an operator (``PENDING_HORIZON``, a week):
  a device still waiting after that starts over from hello once, and waits on;
- a nonce, until it expires and one retry horizon more (``NONCE_MARGIN``), so it outlives the
  challenge that names it and a late enroll hears ``nonce_expired``, not ``nonce_unknown``. A
  deleted nonce is unknown, never usable again.

The sweep deletes at most ``BATCH`` rows per transaction and ``MAX_BATCHES`` transactions per
kind and run: the writer lock is never held for long, other writers get in between batches,
and a backlog (the first run on a registry that never pruned) is worked off over several runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from gateway.store import Store, StoreError
from pki.clock import Clock

__all__ = [
    "BATCH",
    "MAX_BATCHES",
    "NONCE_MARGIN",
    "PENDING_HORIZON",
    "RETRY_HORIZON",
    "SWEEP_SECONDS",
    "Swept",
    "sweep",
]

log = logging.getLogger(__name__)

RETRY_HORIZON = timedelta(hours=1)
PENDING_HORIZON = timedelta(days=7)
NONCE_MARGIN = RETRY_HORIZON
SWEEP_SECONDS = 60.0
# Measured on SQLite (2 cores, answers of 2 kB): a batch of 1,000 answers takes about 20 ms.
# 100 batches a minute keep up with 100,000 answers a minute: 10,000 devices renewing every
# 40 s make 15,000.
BATCH = 1000
MAX_BATCHES = 100


@dataclass(frozen=True)
class Swept:
    """What one run deleted; ``complete`` is False when it stopped at ``max_batches`` (or on a
    registry error) with more left for the next run."""

    answers: int
    nonces: int
    complete: bool


def sweep(
    store: Store,
    clock: Clock,
    *,
    batch: int = BATCH,
    max_batches: int = MAX_BATCHES,
) -> Swept:
    """One retention run, for the gateway to call every ``SWEEP_SECONDS`` (in a worker thread:
    it waits on the database). Never raises for a registry error: it is logged, and the next run
    goes on where this one stopped."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError("batch must be a positive int")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError("max_batches must be a positive int")
    now = clock.now()
    answered_before = now - RETRY_HORIZON
    pending_before = now - PENDING_HORIZON
    expired_before = now - NONCE_MARGIN
    deleted = {"answers": 0, "nonces": 0}
    prunes: dict[str, Callable[[], int]] = {
        "answers": lambda: store.prune_responses(answered_before, pending_before, batch),
        "nonces": lambda: store.prune_nonces(expired_before, batch),
    }
    complete = True
    try:
        for kind, prune in prunes.items():
            for _ in range(max_batches):
                count = prune()
                deleted[kind] += count
                if count < batch:
                    break  # a short batch: nothing of this kind left
            else:
                complete = False
    except StoreError as exc:
        log.warning("retention sweep stopped: %s", exc)
        complete = False
    answers, nonces = deleted["answers"], deleted["nonces"]
    if answers or nonces:
        log.info(
            "retention: %d stored answers and %d nonces deleted%s",
            answers,
            nonces,
            "" if complete else "; more left for the next run",
        )
    return Swept(answers, nonces, complete)
