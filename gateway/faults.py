"""Fault injection: named points on the enrollment path where the gateway can be made to die.

A crash-safety test sets ``FLEETGATE_FAULT=<point>:<nth>`` in the gateway's environment; the
nth time the running process passes that point it sends itself SIGKILL, the way a power cut or
the OOM killer would end it: no ``finally``, no flush, no goodbye to the broker. The test then
restarts the gateway and checks that nothing it promised was broken (no certificate delivered
without its row, no serial twice, every device enrolled in the end, the audit chain intact).

The points, in the order one enrollment passes them::

    after_nonce_issued   the nonce drawn; it is written with its challenge, after this point
    after_csr_verified   CSR, nonce and evidence checked (the nonce is consumed)
    after_signing        the certificate is signed, its row not yet written
    after_row_written    the row and the stored answer are committed, nothing published
    after_publish        the answer was handed to the broker

With the variable unset (every real deployment) ``fault_point()`` is one global lookup and one
comparison. A malformed value is refused loudly at the first pass, so a mistyped test cannot
pass by never injecting anything.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "FAULT_ENV",
    "FaultInjector",
    "FaultPlan",
    "FaultPoint",
    "FaultSpecError",
    "FaultSpecProblem",
    "configure",
    "fault_point",
    "kill_self",
]

FAULT_ENV = "FLEETGATE_FAULT"


class FaultPoint(StrEnum):
    AFTER_NONCE_ISSUED = "after_nonce_issued"
    AFTER_CSR_VERIFIED = "after_csr_verified"
    AFTER_SIGNING = "after_signing"
    AFTER_ROW_WRITTEN = "after_row_written"
    AFTER_PUBLISH = "after_publish"


class FaultSpecProblem(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN_POINT = "unknown_point"
    BAD_COUNT = "bad_count"


class FaultSpecError(ValueError):
    """``FLEETGATE_FAULT`` (or a ``FaultPlan``) does not name a point and a pass to fail at."""

    def __init__(self, reason: FaultSpecProblem, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FaultPlan:
    """Fail at the ``nth`` pass (1 = the first) of ``point``."""

    point: FaultPoint
    nth: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.point, FaultPoint):
            raise TypeError(f"point must be a FaultPoint, not {type(self.point).__name__}")
        if isinstance(self.nth, bool) or not isinstance(self.nth, int):
            raise TypeError(f"nth must be an int, not {type(self.nth).__name__}")
        if self.nth < 1:
            raise FaultSpecError(FaultSpecProblem.BAD_COUNT, f"nth must be >= 1, got {self.nth}")

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """``"<point>"`` or ``"<point>:<nth>"``, e.g. ``"after_signing:3"``."""
        if not isinstance(text, str):
            raise TypeError(f"a fault spec is a str, not {type(text).__name__}")
        name, separator, count = text.strip().partition(":")
        try:
            point = FaultPoint(name)
        except ValueError:
            known = ", ".join(p.value for p in FaultPoint)
            raise FaultSpecError(
                FaultSpecProblem.UNKNOWN_POINT, f"{name!r} is not one of {known}"
            ) from None
        if not separator:
            return cls(point)
        if not count.isdigit() or len(count) > 9:
            raise FaultSpecError(
                FaultSpecProblem.MALFORMED, f"{text!r}: expected <point>:<positive integer>"
            )
        return cls(point, int(count))

    def __str__(self) -> str:
        return f"{self.point.value}:{self.nth}"


def kill_self(point: FaultPoint) -> None:
    """End this process at once, without cleanup: SIGKILL cannot be caught or delayed."""
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    """Counts passes of every point and runs ``action`` once, at the planned pass."""

    def __init__(
        self, plan: FaultPlan | None, action: Callable[[FaultPoint], None] = kill_self
    ) -> None:
        if plan is not None and not isinstance(plan, FaultPlan):
            raise TypeError(f"plan must be a FaultPlan or None, not {type(plan).__name__}")
        self.plan = plan
        self._action = action
        self._lock = threading.Lock()
        self.passes: Counter[FaultPoint] = Counter()
        self.fired = False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> FaultInjector:
        spec = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        return cls(FaultPlan.parse(spec) if spec else None)

    def hit(self, name: str) -> None:
        point = FaultPoint(name)  # a misspelt call site fails here, in the test that arms it
        with self._lock:
            self.passes[point] += 1
            due = (
                not self.fired
                and self.plan is not None
                and self.plan.point is point
                and self.passes[point] == self.plan.nth
            )
            if due:
                self.fired = True
        if due:
            self._action(point)


_injector: FaultInjector | None = None
_unarmed = False  # set once the environment was read and asked for nothing
_configure_lock = threading.Lock()


def configure(injector: FaultInjector | None) -> FaultInjector | None:
    """Use ``injector`` from now on (``None``: read ``FLEETGATE_FAULT`` again at the next
    pass). Returns the one it replaces; tests use this to arm a point in-process."""
    global _injector, _unarmed
    with _configure_lock:
        previous, _injector = _injector, injector
        _unarmed = False
    return previous


def fault_point(name: str) -> None:
    """Mark a point on the enrollment path (a ``FaultPoint`` value)."""
    global _injector, _unarmed
    if _unarmed:
        return
    injector = _injector
    if injector is None:
        with _configure_lock:
            if _injector is None:
                _injector = FaultInjector.from_environment()
            injector = _injector
        if injector.plan is None:
            _unarmed = True
            return
    injector.hit(name)
