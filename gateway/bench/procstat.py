"""CPU time and memory of server processes, read from /proc (Linux).

The gateway's CPU per device is read from the kernel's accounting of the gateway process (all
its threads) and of its broker child, so whatever the simulators spend is never counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessSample", "sample", "sample_all"]

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    cpu_seconds: float  # user + system, every thread
    rss_kb: int
    peak_rss_kb: int

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError("pid must be positive")


def sample(pid: int) -> ProcessSample:
    """Raises ``ProcessLookupError`` when ``pid`` is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    memory = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0])
    return ProcessSample(pid, cpu, memory.get("VmRSS", 0), memory.get("VmHWM", 0))


def sample_all(pids: list[int]) -> list[ProcessSample]:
    """Samples of the processes of ``pids`` that still exist."""
    samples = []
    for pid in pids:
        try:
            samples.append(sample(pid))
        except ProcessLookupError:
            continue
    return samples
