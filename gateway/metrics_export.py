"""The gateway's counters, for an operator: a snapshot, its Prometheus text form, the file.

Every hostile input is answered with a reason code *and counted*; the counts live in memory
(``EnrollmentService.metrics``, ``Gateway.metrics``, the broker's, the admin API's). They reach
an operator two ways: the admin API's ``metrics`` op (``AdminService.snapshot``), and a file a
running gateway rewrites every ``EXPORT_SECONDS`` in the Prometheus text exposition format,
version 0.0.4, for node_exporter's textfile collector and for ``fleetgate metrics``:

    # HELP fleetgate_enrollment_total Enrollment core: requests.<type>, rejected.<reason>, ...
    # TYPE fleetgate_enrollment_total counter
    fleetgate_enrollment_total{node="gw-1",counter="rejected.csr_overreach"} 3
    ...
    fleetgate_up{node="gw-1"} 1
    fleetgate_metrics_timestamp_seconds{node="gw-1"} 1767268800.000

``render`` and ``parse`` are pure; ``MetricsWriter`` writes a temporary file and renames it over
the old one, so a reader sees the previous file or the new one, never half of one. No sample
carries a timestamp of its own: the textfile collector skips a whole file that has one.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.files import write_atomic

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

EXPORT_SECONDS = 10.0
# Older than this, the file's writer has most likely stopped without a last word (killed).
STALE_SECONDS = 3 * EXPORT_SECONDS
FILE_NAME = "metrics.prom"
# A file of counters is read by whoever watches the box (node_exporter runs as its own user);
# it holds counts and the node's name, nothing secret.
FILE_MODE = 0o644
MAX_FILE_BYTES = 4 * 1024 * 1024

SECTIONS = ("enrollment", "gateway", "broker", "admin")
SECTION_HELP = {
    "enrollment": "Enrollment core: requests.<type>, rejected.<reason>, issued, replayed, "
    "errors.internal ...",
    "gateway": "Gateway lifecycle: enforce.retry, clones, refusals.unrecordable ...",
    "broker": "Broker: refused.<reason> (on Mosquitto: its refused handshakes, and nothing "
    "else), denied.<action>, connected.<listener> ...",
    "admin": "Admin API: requests, ok.<op>, rejected.<reason>, events.<what>",
}
PREFIX = "fleetgate"
UP = f"{PREFIX}_up"
TIMESTAMP = f"{PREFIX}_metrics_timestamp_seconds"


def family(section: str) -> str:
    return f"{PREFIX}_{section}_total"


_FAMILY_SECTION = {family(section): section for section in SECTIONS}

Counts = Mapping[str, float]


@dataclass(frozen=True)
class MetricsSnapshot:
    """One gateway's counters at one moment. ``sections`` holds every name of ``SECTIONS``
    (empty when nothing was counted there); ``up`` is False in the last snapshot of a gateway
    that stopped cleanly."""

    node: str
    at: datetime
    sections: Mapping[str, Counts] = field(default_factory=dict)
    up: bool = True

    def section(self, name: str) -> dict[str, float]:
        return dict(sorted(self.sections.get(name, {}).items()))

    def as_json(self) -> dict[str, Any]:
        """The admin API's ``metrics`` result: ``{node, at, enrollment, gateway, broker,
        admin}``, counter names sorted."""
        return {
            "node": self.node,
            "at": self.at.isoformat(),
            **{name: self.section(name) for name in SECTIONS},
        }


# -- reading counters --------------------------------------------------------------------------


def copy_counts(counter: Mapping[str, Any] | None) -> dict[str, float]:
    """A copy of ``counter`` with only numeric values, safe to take from any thread.

    The counters change in other threads (the enrollment worker, the event loop, the admin
    worker). ``dict(counter)`` copies a dict in C under the GIL, so no other thread runs in
    between; should an interpreter ever interleave, the copy is tried again."""
    if not counter:
        return {}
    for _ in range(5):
        try:
            copied = dict(counter)
        except RuntimeError:  # changed size during iteration
            continue
        return {
            str(name): value
            for name, value in copied.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    return {}


def node_name(gateway: Gateway | None = None) -> str:
    """The name a gateway answers with: its cluster node name, else this host's name."""
    cluster = getattr(gateway, "cluster", None)
    node = getattr(cluster, "node", None)
    if isinstance(node, str) and node:
        return node
    return socket.gethostname() or "localhost"


def gateway_counts(gateway: Gateway) -> dict[str, dict[str, float]]:
    """The ``enrollment``, ``gateway`` and ``broker`` sections of a gateway (on Mosquitto the
    broker section holds the refused handshakes read from its log); the admin API adds
    ``admin``."""
    return {
        "enrollment": copy_counts(gateway.enrollment.metrics),
        "gateway": copy_counts(gateway.metrics),
        "broker": copy_counts(getattr(gateway.broker, "metrics", None)),
    }


# -- the text format ---------------------------------------------------------------------------


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed escaped, as the text format requires inside a
    label value; anything that is no valid UTF-8 (a lone surrogate) replaced."""
    text = value.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(snapshot: MetricsSnapshot) -> str:
    """The snapshot in the Prometheus text format (0.0.4): one counter family per section, a
    sample per counter labelled ``counter="<name>"``, then ``fleetgate_up`` and the time of the
    snapshot as gauges. Every sample carries ``node``: gateways of a cluster may share a home
    and one node_exporter."""
    lines: list[str] = []
    node = escape_label_value(snapshot.node)
    for section in SECTIONS:
        name = family(section)
        lines.append(f"# HELP {name} {_escape_help(SECTION_HELP[section])}")
        lines.append(f"# TYPE {name} counter")
        merged: dict[str, float] = {}
        for counter, value in snapshot.sections.get(section, {}).items():
            # two names that escape alike would be one series twice: the collector rejects that
            label = escape_label_value(counter)
            merged[label] = merged.get(label, 0) + value
        for label, value in sorted(merged.items()):
            lines.append(f'{name}{{node="{node}",counter="{label}"}} {_number(value)}')
    lines += [
        f"# HELP {UP} 1 while the gateway runs; 0 written by a gateway that stopped cleanly.",
        f"# TYPE {UP} gauge",
        f'{UP}{{node="{node}"}} {1 if snapshot.up else 0}',
        f"# HELP {TIMESTAMP} When these counts were taken (Unix time).",
        f"# TYPE {TIMESTAMP} gauge",
        f'{TIMESTAMP}{{node="{node}"}} {snapshot.at.timestamp():.3f}',
    ]
    return "\n".join(lines) + "\n"


class MetricsFileReason(StrEnum):
    MISSING = "missing"
    UNREADABLE = "unreadable"
    MALFORMED = "malformed"


class MetricsFileError(Exception):
    def __init__(self, reason: MetricsFileReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)')
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), "\\" + m.group(1)), value)


def _parse_labels(text: str, line_no: int) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if match is None or match.end() == position:
            raise MetricsFileError(
                MetricsFileReason.MALFORMED, f"line {line_no}: unreadable labels {text[:80]!r}"
            )
        labels[match.group(1)] = _unescape(match.group(2))
        position = match.end()
    return labels


def _parse_value(text: str, line_no: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MetricsFileError(
            MetricsFileReason.MALFORMED, f"line {line_no}: {text[:40]!r} is not a number"
        ) from None
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def parse(text: str) -> MetricsSnapshot:
    """Read back what ``render`` wrote (families it does not know are skipped, so a newer
    gateway's file still reads). ``MetricsFileError(MALFORMED)`` names the first bad line, or
    says what is missing."""
    sections: dict[str, dict[str, float]] = {section: {} for section in SECTIONS}
    node: str | None = None
    up: bool | None = None
    at: datetime | None = None
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            raise MetricsFileError(
                MetricsFileReason.MALFORMED, f"line {line_no}: not a sample: {line[:80]!r}"
            )
        name, label_text, value_text = match.groups()
        labels = _parse_labels(label_text or "", line_no)
        value = _parse_value(value_text, line_no)
        node = labels.get("node", node)
        section = _FAMILY_SECTION.get(name)
        if section is not None and "counter" in labels:
            sections[section][labels["counter"]] = value
        elif name == UP:
            up = value == 1
        elif name == TIMESTAMP:
            try:
                at = datetime.fromtimestamp(value, UTC)
            except (OverflowError, OSError, ValueError):
                raise MetricsFileError(
                    MetricsFileReason.MALFORMED, f"line {line_no}: no time: {value_text[:40]!r}"
                ) from None
    if at is None or up is None or node is None:
        raise MetricsFileError(
            MetricsFileReason.MALFORMED, f"no {UP} or {TIMESTAMP} sample with a node label"
        )
    return MetricsSnapshot(node=node, at=at, sections=sections, up=up)


# -- the file ----------------------------------------------------------------------------------


def metrics_path(home: Path, node: str | None = None) -> Path:
    """``<home>/metrics.prom``; ``<home>/metrics-<node>.prom`` for a gateway of a cluster
    (several may share a home: one file each, or each rename would replace another's)."""
    return home / (FILE_NAME if node is None else f"metrics-{node}.prom")


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` whole with ``text`` (``gateway.files.write_atomic``): a reader opens the
    old file or the new one. The temporary name ends in ``.tmp``, not ``.prom``, so a textfile
    collector reading the folder never picks it up. No fsync: the file is rewritten every
    ``EXPORT_SECONDS``, and one lost in a power cut is rewritten at the next start."""
    write_atomic(path, text.encode("utf-8"), FILE_MODE, fsync=False, suffix=".tmp")


def read_metrics(path: Path) -> MetricsSnapshot:
    """The snapshot in ``path``; ``MetricsFileError`` (missing, unreadable, malformed)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise MetricsFileError(MetricsFileReason.MISSING, f"{path} does not exist") from None
    except OSError as exc:
        raise MetricsFileError(
            MetricsFileReason.UNREADABLE, f"{path}: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise MetricsFileError(
            MetricsFileReason.MALFORMED, f"{path} is over {MAX_FILE_BYTES} bytes"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsFileError(MetricsFileReason.MALFORMED, f"{path} is not UTF-8") from None
    return parse(text)


class MetricsWriter:
    """Writes ``collect()`` to ``path`` on each ``write()``; ``close()`` writes a last time
    with ``fleetgate_up 0`` and ignores later writes (a periodic write still running in a
    thread must not bring ``up 1`` back). Never raises: a full disk is logged, once until it
    clears, and the gateway goes on.

    ``close()`` touches only a file this writer wrote: a gateway that failed to start (its
    ports taken by one running on the same home) must not tell the running one's readers that
    it stopped. ``remove_at_close``: ``close()`` deletes the file instead, for a writer whose
    file name is this process's alone (a cluster node named after its pid): no one would ever
    write that file again, and node_exporter would export its ``up 0`` for ever."""

    def __init__(
        self,
        path: Path,
        collect: Callable[[], MetricsSnapshot],
        *,
        remove_at_close: bool = False,
    ) -> None:
        self.path = path
        self._collect = collect
        self._remove_at_close = remove_at_close
        self._lock = threading.Lock()
        self._closed = False
        self._failing = False
        self._wrote = False  # whether the file at ``path`` is this writer's

    def write(self) -> bool:
        with self._lock:
            return False if self._closed else self._write_locked(up=True)

    def close(self) -> bool:
        """The last word: True when the file was written (``up 0``) or removed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            if not self._wrote:
                return False
            if not self._remove_at_close:
                return self._write_locked(up=False)
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove the metrics file %s: %s", self.path, exc)
                return False
            return True

    def _write_locked(self, *, up: bool) -> bool:
        try:
            snapshot = self._collect()
            if not up:
                snapshot = MetricsSnapshot(snapshot.node, snapshot.at, snapshot.sections, False)
            write_atomically(self.path, render(snapshot))
        except Exception as exc:
            if not self._failing:
                log.warning("could not write the metrics file %s: %s", self.path, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("metrics file %s written again", self.path)
        self._failing = False
        self._wrote = True
        return True
