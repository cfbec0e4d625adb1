"""CPU time and memory of server processes, read from /proc (Linux).

The gateway's CPU per device is read from the kernel's accounting of the gateway process (all
its threads) and of its broker child, so whatever the simulators spend is never counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessSample", "context_switches", "main_thread_cpu", "sample", "sample_all"]

_TICKS = os.sysconf("SC_CLK_TCK")
_VOLUNTARY, _INVOLUNTARY = "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    cpu_seconds: float  # user + system, every thread
    rss_kb: int
    peak_rss_kb: int

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError("pid must be positive")


def _cpu_of(stat: str) -> float:
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _status_numbers(status: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The ``keys`` found in the text of a /proc/<pid>/status, each as the number its value
    starts with ("VmRSS:    1234 kB" is 1234)."""
    found = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0])
    return found


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread alone (an asyncio service's event loop; the
    rest of ``sample(pid).cpu_seconds`` is its other threads'). Raises ``ProcessLookupError``
    when ``pid`` is gone."""
    try:
        return _cpu_of(Path(f"/proc/{pid}/task/{pid}/stat").read_text())
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None


def sample(pid: int) -> ProcessSample:
    """Raises ``ProcessLookupError`` when ``pid`` is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    memory = _status_numbers(status, ("VmRSS", "VmHWM"))
    return ProcessSample(pid, _cpu_of(stat), memory.get("VmRSS", 0), memory.get("VmHWM", 0))


def sample_all(pids: list[int]) -> list[ProcessSample]:
    """Samples of the processes of ``pids`` that still exist."""
    samples = []
    for pid in pids:
        try:
            samples.append(sample(pid))
        except ProcessLookupError:
            continue
    return samples


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid`` so far: a thread
    that sleeps and is woken again counts one voluntary switch, one the scheduler preempts
    an involuntary one. Raises ``ProcessLookupError`` when ``pid`` is gone."""
    voluntary = involuntary = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        switches = _status_numbers(status, (_VOLUNTARY, _INVOLUNTARY))
        voluntary += switches.get(_VOLUNTARY, 0)
        involuntary += switches.get(_INVOLUNTARY, 0)
    return voluntary, involuntary
