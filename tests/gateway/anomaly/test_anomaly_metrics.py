"""Per-identity metrics and the robust statistics built on them."""

from __future__ import annotations

import pytest

from gateway.anomaly import RateReference, RateStats, host_of, normalise_topic
from gateway.anomaly.baseline import Cusum, OwnBaseline, PeerGroup, mad, median, quantile
from gateway.anomaly.metrics import IdentityMetrics

T0 = 1_767_225_600.0  # a minute boundary (2026-01-01T00:00:00Z)


def metrics(identity: str = "dev-0", now: float = T0) -> IdentityMetrics:
    return IdentityMetrics(
        identity,
        now,
        bucket_seconds=10,
        max_closed=60,
        max_topics=4,
        max_hosts=2,
        alarm_messages=1e9,
        alarm_bytes=1e9,
    )


def test_topics_are_normalised_on_the_identity_s_own_level_only() -> None:
    assert normalise_topic("fg/v1/dev/s-7/telemetry", "s-7") == "fg/v1/dev/{id}/telemetry"
    assert normalise_topic("fg/v1/dev/s-77/telemetry", "s-7") == "fg/v1/dev/s-77/telemetry"
    assert normalise_topic("fg/v1/dev/other/cmd/s-7", "s-7") == "fg/v1/dev/other/cmd/{id}"


@pytest.mark.parametrize(
    ("remote", "host"),
    [
        ("10.0.0.5:50000", "10.0.0.5"),
        ("[2001:db8::1]:8883", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("gateway.local", "gateway.local"),
        ("[broken", "[broken"),
    ],
)
def test_host_of(remote: str, host: str) -> None:
    assert host_of(remote) == host


def test_the_window_slides_over_the_last_minute() -> None:
    m = metrics()
    m.connected(T0, "10.0.0.1")
    for second in range(0, 60, 5):
        m.published(T0 + second, 100)
    assert (m.window_messages, m.window_bytes) == (12, 1200)
    m.advance(T0 + 85)  # the first 30 s have slid out (10 s buckets)
    assert m.window_messages == 6
    m.advance(T0 + 10_000)
    assert (m.window_messages, m.window_bytes) == (0, 0)


def test_only_clean_minutes_are_learned() -> None:
    m = metrics()
    m.connected(T0 - 1, "10.0.0.1")  # the first minute is partial: not learned
    for second in range(0, 600, 5):
        m.published(T0 + m.phase * 10 + second, 50)
    assert m.closed[:3] == [(12, 600)] * 3
    m.closed.clear()
    m.disconnected(T0 + 600)
    m.advance(T0 + 3600)  # an offline hour teaches nothing
    assert m.closed == []
    m.connected(T0 + 3600, "10.0.0.1")
    m.advance(T0 + 3600 + 5 * 60)  # connected and silent: real zero minutes
    assert m.closed and set(m.closed) == {(0, 0)}


def test_no_zero_minutes_are_learned_while_a_silence_alarm_stands() -> None:
    m = metrics()
    m.connected(T0 - 1, "10.0.0.1")
    m.silenced = True
    m.advance(T0 + 600)
    assert m.closed == []


def test_a_long_jump_in_time_costs_no_loop_per_minute() -> None:
    m = metrics()
    m.connected(T0, "10.0.0.1")
    m.published(T0 + 1e9, 10)  # ~30 years later: bounded by the history size
    assert len(m.closed) <= 60


def test_gap_statistics_tell_periodic_from_poisson() -> None:
    import random

    periodic, poisson = metrics("p"), metrics("q")
    rng = random.Random(3)
    t = u = T0
    for _ in range(400):
        t += 5 + rng.uniform(-0.5, 0.5)
        u += rng.expovariate(1 / 5)
        periodic.published(t, 10)
        poisson.published(u, 10)
    assert periodic.gap_cv < 0.15
    assert 0.7 < poisson.gap_cv < 1.3
    assert poisson.gap_mean == pytest.approx(5, rel=0.3)


def test_robust_statistics() -> None:
    assert median([]) == 0.0 and median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5
    assert mad([1, 2, 3, 4, 100], 3) == 1
    assert quantile([1, 2, 3], 0.95) == 3 and quantile(list(range(1, 101)), 0.95) == 95


def test_a_steady_device_tolerates_a_couple_of_extra_messages() -> None:
    stats = RateStats.of([12] * 30, [984] * 30, gap_cv=0.05)
    reference = RateReference.own(stats, 5.0)
    assert stats.mad_messages == 0  # yet the floors keep the alarm above +2 messages
    assert 14 < reference.alarm_messages < 20
    assert 984 + 2 * 82 < reference.alarm_bytes < 2 * 984


def test_a_poisson_device_gets_a_wider_margin_than_a_periodic_one() -> None:
    periodic = RateReference.own(RateStats.of([12] * 30, [984] * 30, gap_cv=0.05), 5.0)
    poisson = RateReference.own(RateStats.of([12] * 30, [984] * 30, gap_cv=1.0), 5.0)
    assert poisson.alarm_messages > periodic.alarm_messages + 10


def test_bursty_traffic_is_recognised_from_its_counts() -> None:
    counts = [0, 8, 4, 12, 4, 0, 8, 4, 16, 0] * 3  # bursts of four
    stats = RateStats.of(counts, [c * 400 for c in counts], gap_cv=0.3)
    assert stats.dispersion > 1.5


def test_cusum_accumulates_a_run_and_forgets_noise() -> None:
    cusum = Cusum()
    for z in (0.5, -1.0, 0.7, -0.2):
        cusum.update(z, 1.0, k=0.75, clip=4)
    assert cusum.value == 0 and cusum.run == 0
    for sample in (1.0, 2.0, 3.0):
        cusum.update(10.0, sample, k=0.75, clip=4)  # clipped: 3.25 per step
    assert cusum.value == pytest.approx(9.75) and cusum.run == 3 and cusum.average == 2.0


def test_the_baseline_keeps_a_bounded_ring() -> None:
    baseline = OwnBaseline(5)
    for minute in range(12):
        baseline.add(minute, minute * 10)
    stats = baseline.refresh(1.0)
    assert baseline.minutes == 5 and stats is not None and stats.median_messages == 9


def test_a_peer_group_needs_enough_warm_members_and_uses_their_upper_quantile() -> None:
    group = PeerGroup("m", T0, max_patterns=2)
    own = [RateReference.own(RateStats.of([n] * 10, [n * 80] * 10, 0.1), 5.0) for n in (6, 12)]
    group.refresh(own, min_peers=3, fraction=0.95)
    assert group.reference is None
    own.append(RateReference.own(RateStats.of([60] * 10, [4800] * 10, 0.1), 5.0))
    group.refresh(own, min_peers=3, fraction=0.95)
    assert group.reference is not None
    assert group.reference.alarm_messages == max(r.alarm_messages for r in own)
    assert group.reference.peer_median_messages == 12
    assert group.used("a") and group.used("b") and group.used("a")
    assert not group.used("c") and group.topic_users == {"a": 2, "b": 1}
