"""The metrics file: the Prometheus text format a textfile collector reads, written so that a
reader never sees half of it, and read back by `fleetgate metrics`."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import metrics_export
from gateway.metrics_export import (
    SECTIONS,
    MetricsFileError,
    MetricsFileReason,
    MetricsSnapshot,
    MetricsWriter,
    copy_counts,
    escape_label_value,
    gateway_counts,
    metrics_path,
    parse,
    read_metrics,
    render,
    write_atomically,
)
from gateway.mosquitto import HandshakeWatch, Listeners, MosquittoBroker

AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def snapshot(node: str = "gw-1", up: bool = True, **sections: dict[str, float]) -> MetricsSnapshot:
    return MetricsSnapshot(node=node, at=AT, sections=sections, up=up)


def samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# -- the format -------------------------------------------------------------------------------


def test_one_counter_family_per_section_then_up_and_the_time() -> None:
    text = render(
        snapshot(
            enrollment={"rejected.csr_overreach": 3, "requests.hello": 12},
            broker={"refused.not_admitted": 1},
        )
    )
    assert text.endswith("\n")
    assert samples(text) == [
        'fleetgate_enrollment_total{node="gw-1",counter="rejected.csr_overreach"} 3',
        'fleetgate_enrollment_total{node="gw-1",counter="requests.hello"} 12',
        'fleetgate_broker_total{node="gw-1",counter="refused.not_admitted"} 1',
        'fleetgate_up{node="gw-1"} 1',
        f'fleetgate_metrics_timestamp_seconds{{node="gw-1"}} {AT.timestamp():.3f}',
    ]
    # every family is declared once, sections without counts too (names stay discoverable)
    types = [line.split()[2:] for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == [
        *([f"fleetgate_{section}_total", "counter"] for section in SECTIONS),
        ["fleetgate_up", "gauge"],
        ["fleetgate_metrics_timestamp_seconds", "gauge"],
    ]
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(types)


def test_a_stopped_gateway_says_up_0() -> None:
    assert 'fleetgate_up{node="gw-1"} 0' in samples(render(snapshot(up=False)))


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("two\nlines", "two\\nlines"),
        ('\\"\n', '\\\\\\"\\n'),
        ("tab\tand ünïcode", "tab\tand ünïcode"),  # only the three are escaped
    ],
)
def test_label_values_escape_backslash_quote_and_line_feed(raw: str, escaped: str) -> None:
    assert escape_label_value(raw) == escaped


def test_a_hostile_counter_name_stays_one_sample_and_reads_back_the_same() -> None:
    name = 'rejected.x"} 99\nfleetgate_up{node="evil"} 0\\'
    text = render(snapshot(node='gw "one"', gateway={name: 2}))
    [line] = [s for s in samples(text) if s.startswith("fleetgate_gateway_total")]
    assert "\n" not in line and line.endswith("} 2")
    assert samples(text).count('fleetgate_up{node="gw \\"one\\""} 1') == 1
    back = parse(text)
    assert back.node == 'gw "one"' and back.up is True
    assert back.section("gateway") == {name: 2}


def test_a_name_that_is_no_valid_utf8_is_replaced_not_a_crash() -> None:
    text = render(snapshot(admin={"rejected.\udcff": 1}))
    text.encode("utf-8")  # writable as the format requires
    assert parse(text).section("admin") == {"rejected.?": 1}


def test_render_then_parse_gives_the_snapshot_back() -> None:
    original = snapshot(
        enrollment={"issued": 7, "replayed": 0},
        gateway={"enforce.retry": 1},
        broker={},
        admin={"requests": 4, "ok.metrics": 2, "ratio": 0.25},
    )
    back = parse(render(original))
    assert back.node == original.node and back.up and back.at == AT
    for section in SECTIONS:
        assert back.section(section) == original.section(section)
    assert back.as_json() == original.as_json()


def test_families_parse_does_not_know_are_skipped() -> None:
    text = render(snapshot(gateway={"clones": 1}))
    newer = "# TYPE fleetgate_cluster_total counter\nfleetgate_cluster_total{counter=\"x\"} 5\n"
    assert parse(newer + text).section("gateway") == {"clones": 1}


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("fleetgate_up{node=\"a\"} 1\nwhat is this\n", "line 2"),
        ('fleetgate_up{node="a} 1\n', "line 1"),
        ('fleetgate_up{node="a"} one\n', "not a number"),
        ('fleetgate_up{node="a"} 1\n', "fleetgate_metrics_timestamp_seconds"),
        ("", "fleetgate_up"),
        ('fleetgate_up{node="a"} 1\nfleetgate_metrics_timestamp_seconds{node="a"} NaN\n', "time"),
    ],
)
def test_a_damaged_file_is_malformed_with_the_reason(text: str, found: str) -> None:
    with pytest.raises(MetricsFileError) as caught:
        parse(text)
    assert caught.value.reason is MetricsFileReason.MALFORMED
    assert found in caught.value.detail


# -- counters ---------------------------------------------------------------------------------


def test_only_numbers_are_copied() -> None:
    counts = {"a": 1, "b": 2.5, "flag": True, "text": "x", "none": None}
    assert copy_counts(counts) == {"a": 1, "b": 2.5}
    assert copy_counts(None) == {}


def test_counters_copied_while_another_thread_adds_to_them() -> None:
    counter: Counter[str] = Counter()
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            counter[f"rejected.{n % 1000}"] += 1
            n += 1

    worker = threading.Thread(target=count)
    worker.start()
    try:
        sizes = [len(copy_counts(counter)) for _ in range(300)]
    finally:
        stop.set()
        worker.join()
    assert sizes == sorted(sizes) and sizes[-1] > 0


def test_a_gateway_on_mosquitto_exports_the_handshakes_its_broker_refused(
    tmp_path: Path,
) -> None:
    """Mosquitto's counters are the refused handshakes read from its log: they reach the
    broker section, and the file, as the embedded broker's do."""
    broker = MosquittoBroker(
        tmp_path / "unused",
        Listeners("127.0.0.1", 1883, 1884, 1885),
        None,
        None,
        external=True,
        admin_password="operator-secret-0123",
    )
    broker._handshakes = HandshakeWatch([1884])  # what start() sets up for its TLS listener
    for line in (
        "New connection from 127.0.0.3:54465 on port 1884.",
        "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
        "Client <unknown> disconnected: Protocol error.",
    ):
        broker._watch_handshake(line)
    gateway = SimpleNamespace(
        enrollment=SimpleNamespace(metrics=Counter({"rejected.nonce_unknown": 2})),
        metrics=Counter({"clones": 1}),
        broker=broker,
    )
    counts = gateway_counts(gateway)  # type: ignore[arg-type]
    assert counts == {
        "enrollment": {"rejected.nonce_unknown": 2},
        "gateway": {"clones": 1},
        "broker": {"refused.certificate_invalid": 1},
    }
    exported = parse(render(MetricsSnapshot("gw-1", AT, counts)))
    assert exported.section("broker") == {"refused.certificate_invalid": 1}


def test_a_broker_control_without_counters_has_an_empty_broker_section() -> None:
    """A cluster's shared Mosquitto is driven through a control that counts nothing."""
    gateway = SimpleNamespace(enrollment=SimpleNamespace(metrics=None), metrics=Counter(),
                              broker=object())  # fmt: skip
    assert gateway_counts(gateway)["broker"] == {}  # type: ignore[arg-type]


def test_a_cluster_member_writes_a_file_of_its_own(tmp_path: Path) -> None:
    assert metrics_path(tmp_path) == tmp_path / "metrics.prom"
    assert metrics_path(tmp_path, "gw-2") == tmp_path / "metrics-gw-2.prom"
    member = SimpleNamespace(cluster=SimpleNamespace(node="gw-2"))
    assert metrics_export.node_name(member) == "gw-2"  # type: ignore[arg-type]


# -- the file ---------------------------------------------------------------------------------


def test_the_new_file_replaces_the_old_one_in_a_single_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.prom"
    path.write_text("old\n")
    seen: list[tuple[str, str, str]] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        # the moment before the rename: the reader still has the whole old file, and the
        # whole new one waits beside it under a name no textfile collector reads
        seen.append((Path(source).name, Path(target).read_text(), Path(source).read_text()))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    write_atomically(path, "new\n")
    [(temporary, before, staged)] = seen
    assert (before, staged) == ("old\n", "new\n")
    assert not temporary.endswith(".prom")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.prom"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.prom"
    path.write_text("old\n")

    def full_disk(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.prom"]


def test_a_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.prom"
    big = {f"rejected.reason_{n}": n for n in range(1000)}  # ~80 KB: several write() calls
    write_atomically(path, render(snapshot(enrollment={**big, "issued": 0})))
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            write_atomically(path, render(snapshot(enrollment={**big, "issued": n})))

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        issued = []
        for _ in range(60):
            enrollment = read_metrics(path).section("enrollment")  # malformed if cut short
            assert len(enrollment) == len(big) + 1
            issued.append(enrollment["issued"])
    finally:
        stop.set()
        writer.join()
    assert issued == sorted(issued) and issued[-1] > 0  # it was rewritten meanwhile


def test_reading_a_missing_an_unreadable_or_a_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(MetricsFileError) as caught:
        read_metrics(tmp_path / "metrics.prom")
    assert caught.value.reason is MetricsFileReason.MISSING
    with pytest.raises(MetricsFileError) as caught:
        read_metrics(tmp_path)  # a folder
    assert caught.value.reason is MetricsFileReason.UNREADABLE
    binary = tmp_path / "binary.prom"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(MetricsFileError) as caught:
        read_metrics(binary)
    assert caught.value.reason is MetricsFileReason.MALFORMED


# -- the writer -------------------------------------------------------------------------------


def test_close_writes_up_0_and_later_writes_cannot_bring_up_back(tmp_path: Path) -> None:
    counts = Counter({"issued": 1})
    path = tmp_path / "metrics.prom"
    writer = MetricsWriter(path, lambda: snapshot(enrollment=dict(counts)))
    assert writer.write() is True
    assert read_metrics(path).up is True
    counts["issued"] += 1
    assert writer.close() is True
    last = read_metrics(path)
    assert last.up is False and last.section("enrollment") == {"issued": 2}
    # a periodic write still running in its thread when the gateway stopped
    assert writer.write() is False
    assert read_metrics(path).up is False


def test_a_failing_write_is_logged_once_and_the_gateway_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / "metrics.prom"  # the folder is missing
    writer = MetricsWriter(path, lambda: snapshot())
    with caplog.at_level(logging.INFO, logger="gateway.metrics_export"):
        assert writer.write() is False
        assert writer.write() is False
        path.parent.mkdir()
        assert writer.write() is True
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "could not write" in m]) == 1
    assert any("written again" in m for m in messages)
    assert read_metrics(path).node == "gw-1"


def test_a_collect_that_fails_is_a_failed_write_not_an_exception(tmp_path: Path) -> None:
    def broken() -> MetricsSnapshot:
        raise RuntimeError("a bug")

    assert MetricsWriter(tmp_path / "metrics.prom", broken).write() is False
    assert not (tmp_path / "metrics.prom").exists()


def test_close_leaves_a_file_it_never_wrote_alone(tmp_path: Path) -> None:
    """A gateway that failed to start (its ports taken by one running on the same home) must
    not tell the running one's readers that it stopped."""
    path = tmp_path / "metrics.prom"
    write_atomically(path, render(snapshot(node="running", enrollment={"issued": 9})))
    before = path.read_text()
    writer = MetricsWriter(path, lambda: snapshot(node="failed"))
    assert writer.close() is False
    assert path.read_text() == before
    assert writer.write() is False  # closed all the same


def test_a_writer_removing_at_close_takes_only_its_own_file_away(tmp_path: Path) -> None:
    path = tmp_path / "metrics-host-4242.prom"
    writer = MetricsWriter(path, lambda: snapshot(), remove_at_close=True)
    assert writer.write() is True and path.exists()
    assert writer.close() is True
    assert not path.exists()
    assert writer.write() is False and not path.exists()
    # never written: not its file, left where it is
    path.write_text("someone else's\n")
    assert MetricsWriter(path, lambda: snapshot(), remove_at_close=True).close() is False
    assert path.read_text() == "someone else's\n"
