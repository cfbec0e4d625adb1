"""A rig for the anomaly engine tests: a fake clock, a registry of contexts, devices that publish
like the simulators do (every ``interval`` seconds, +-``jitter``), and evaluate() every 5 s."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.anomaly import (
    AnomalyEngine,
    AnomalySettings,
    DetectionKind,
    IdentityContext,
    Verdict,
)
from gateway.observe import Connected, Observation, Published
from gateway.store import IdentityState
from pki.clock import FakeClock
from pki.profile import IdentityKind

START = datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)
FIRMWARE = ("1.4.2", "a" * 64)
EVALUATE_EVERY = 5.0


@dataclass
class Sender:
    """A device publishing ``size`` bytes to its telemetry topic every ``interval`` s."""

    identity: str
    interval: float = 5.0
    size: int | Callable[[float], int] = 82
    jitter: float = 0.1
    topic: str | None = None
    due: float = 0.0  # seconds since the rig's start
    active: bool = True

    def __post_init__(self) -> None:
        if self.topic is None:
            self.topic = f"fg/v1/dev/{self.identity}/telemetry"

    def payload_size(self, elapsed: float) -> int:
        return self.size(elapsed) if callable(self.size) else self.size


@dataclass
class Rig:
    settings: AnomalySettings = field(default_factory=AnomalySettings)
    seed: int = 7

    def __post_init__(self) -> None:
        self.clock = FakeClock(START)
        self.contexts: dict[str, IdentityContext] = {}
        self.engine = AnomalyEngine(self.clock, self.settings, self.lookup)
        self.senders: dict[str, Sender] = {}
        self.verdicts: list[Verdict] = []
        self.random = random.Random(self.seed)
        self.next_evaluation = EVALUATE_EVERY

    def lookup(self, identity: str) -> IdentityContext | None:
        return self.contexts.get(identity)

    @property
    def elapsed(self) -> float:
        return (self.clock.now() - START).total_seconds()

    def register(
        self,
        identity: str,
        *,
        model: str = "th-sensor",
        state: IdentityState = IdentityState.ACTIVE,
        enrolled_ago: timedelta = timedelta(days=30),
        firmware: tuple[str, str] = FIRMWARE,
        kind: IdentityKind = IdentityKind.DEVICE,
    ) -> None:
        self.contexts[identity] = IdentityContext(
            kind=kind,
            state=state,
            model=model,
            firmware_version=firmware[0],
            firmware_digest=firmware[1],
            enrolled_at=self.clock.now() - enrolled_ago,
        )

    def device(self, identity: str, *, remote: str = "10.0.0.5:40000", **sender: object) -> Sender:
        """Register (unless already), connect and start publishing."""
        if identity not in self.contexts:
            self.register(identity)
        self.observe(Connected(identity, remote))
        created = Sender(identity, **sender)  # type: ignore[arg-type]
        created.due = self.elapsed + self.random.uniform(0.5, 3.0)
        self.senders[identity] = created
        return created

    def observe(self, observation: Observation) -> None:
        self.engine.observe(observation)

    def run(self, seconds: float) -> list[Verdict]:
        """Advance ``seconds``, publishing what is due and evaluating every 5 s; returns the
        verdicts raised meanwhile (also kept in ``verdicts``)."""
        end = self.elapsed + seconds
        found: list[Verdict] = []
        while True:
            due = [s for s in self.senders.values() if s.active]
            next_send = min((s.due for s in due), default=end + 1)
            step = min(next_send, self.next_evaluation, end)
            if step > self.elapsed:
                self.clock.set(START + timedelta(seconds=step))
            if step >= end and next_send > end and self.next_evaluation > end:
                break
            if next_send <= step:
                for sender in due:
                    if sender.due <= step:
                        assert sender.topic is not None
                        self.observe(
                            Published(sender.identity, sender.topic, sender.payload_size(step))
                        )
                        spread = sender.interval * sender.jitter
                        sender.due = step + sender.interval + self.random.uniform(-spread, spread)
            if self.next_evaluation <= step:
                found += self.engine.evaluate()
                self.next_evaluation += EVALUATE_EVERY
        self.verdicts += found
        return found


def kinds(verdicts: Iterable[Verdict]) -> list[DetectionKind]:
    return [v.detection.kind for v in verdicts]


def first(verdicts: Iterable[Verdict], kind: DetectionKind) -> Verdict:
    for verdict in verdicts:
        if verdict.detection.kind is kind:
            return verdict
    raise AssertionError(f"no {kind} among {[str(v.detection.kind) for v in verdicts]}")


def warm_fleet(rig: Rig, count: int = 5, *, model: str = "th-sensor", minutes: int = 40) -> None:
    """``count`` periodic devices of ``model``, past their warm-up and the drift warm-up."""
    for index in range(count):
        rig.register(f"{model}-{index}", model=model)
        rig.device(f"{model}-{index}", remote=f"10.0.1.{index + 1}:40000")
    assert rig.run(minutes * 60) == []
