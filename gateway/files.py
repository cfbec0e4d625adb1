"""Replacing a file whole, so that a reader never opens half of one.

Kept apart from ``gateway.mosquitto`` (whose package loads the broker) so that the command line
and the metrics writer can use it without importing a broker."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(
    path: Path, data: bytes, mode: int = 0o600, *, fsync: bool = True, suffix: str = ""
) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``.<name>.<random><suffix>``), then
    rename it over ``path``: a reader (Mosquitto on SIGHUP, a textfile collector) sees the old
    file or the new one, never a mix. ``fsync=False`` skips flushing to disk before the rename,
    for a file rewritten every few seconds whose loss in a power cut costs nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # the first failure is the one to report, not a failure to clean up after it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
