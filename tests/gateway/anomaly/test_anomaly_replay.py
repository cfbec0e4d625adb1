"""Many device-hours of normal, noisy traffic raise nothing; labelled hostile streams are
found; and no sequence of observations makes the engine raise."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.acl import Action as AclAction
from gateway.anomaly import AnomalyEngine, AnomalySettings, IdentityContext
from gateway.anomaly.evaluate import ReplaySpec, Scenario, format_report, replay
from gateway.observe import (
    CertificateIssued,
    Connected,
    Denied,
    Disconnected,
    Observation,
    Published,
)
from gateway.store import IdentityState
from pki.clock import FakeClock
from pki.profile import IdentityKind


def test_hundreds_of_normal_device_hours_raise_no_alert() -> None:
    # Four models (periodic like the simulators, Poisson, slow Poisson, bursty with a daily
    # swing), devices joining over the first hour, renewals, reconnects after renewal,
    # network cuts: ~600 device-hours, ~500,000 observations.
    report = replay(ReplaySpec(devices=120, hours=6, seed=11))
    assert report.normal_device_hours > 550
    assert report.false_alerts == 0, format_report(report)
    assert report.counters.get("ignored.error", 0) == 0
    assert report.counters.get("ignored.malformed", 0) == 0


def test_every_hostile_mode_is_found_and_most_within_a_minute() -> None:
    # Devices of the two chatty models (a message every 5 s and every 12 s): a rate that
    # doubles on a device sending one message a minute takes any detector with this false
    # alarm budget ~30 minutes to tell from chance (docs/anomaly.md, "Limits").
    spec = ReplaySpec(devices=60, hours=3, hostile_per_scenario=3, seed=5)
    report = replay(replace(spec, models=spec.models[:2]))
    assert report.false_alerts == 0, format_report(report)
    by_mode = {result.scenario: result for result in report.scenarios}
    for mode, result in by_mode.items():
        assert result.recall == 1.0, (mode, format_report(report))
    for mode in (
        Scenario.FLOOD,
        Scenario.PROBER,
        Scenario.CLONE,
        Scenario.TAMPER,
        Scenario.STORM,
        Scenario.NEW_SOURCE,
        Scenario.NEW_TOPIC,
        Scenario.COLD_FLOOD,
        Scenario.ENROLL_FLOOD,
    ):
        assert by_mode[mode].within_60s == 1.0, (mode, format_report(report))


NAMES = st.sampled_from(["dev-0", "dev-1", "ghost", "op", ""])
TEXT = st.text(max_size=30)
OBSERVATIONS = st.one_of(
    st.builds(
        Published,
        NAMES,
        st.one_of(
            TEXT, st.sampled_from(["fg/v1/dev/dev-0/telemetry", "fg/v1/dev/dev-0/renew/req"])
        ),
        st.integers(min_value=-10, max_value=10**9),
    ),
    st.builds(Denied, NAMES, st.sampled_from(list(AclAction)), TEXT),
    st.builds(Connected, NAMES, TEXT),
    st.builds(Disconnected, NAMES),
    st.builds(
        CertificateIssued,
        NAMES,
        st.booleans(),
        st.one_of(st.none(), TEXT),
        st.one_of(st.none(), TEXT),
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(OBSERVATIONS, st.floats(min_value=0, max_value=4000), st.booleans()),
        max_size=60,
    )
)
def test_no_sequence_of_observations_makes_the_engine_raise(
    steps: list[tuple[Observation, float, bool]],
) -> None:
    clock = FakeClock()
    contexts = {
        name: IdentityContext(IdentityKind.DEVICE, IdentityState.ACTIVE, model="m")
        for name in ("dev-0", "dev-1")
    }
    contexts["op"] = IdentityContext(IdentityKind.OPERATOR, IdentityState.ACTIVE)
    engine = AnomalyEngine(
        clock, AnomalySettings(warmup_minutes=1, warmup_messages=1), contexts.get
    )
    for observation, seconds, evaluate in steps:
        clock.advance(timedelta(seconds=seconds))
        engine.observe(observation)
        if evaluate:
            engine.evaluate()
            engine.snapshot(observation.identity)
    engine.evaluate()
    assert engine.counters["ignored.error"] == 0
