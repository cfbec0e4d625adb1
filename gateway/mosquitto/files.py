"""Writing the broker's files so that Mosquitto never reads half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["rotate_if_large", "write_atomic"]


def rotate_if_large(path: Path, limit: int) -> bool:
    """Move ``path`` to ``<path>.1`` (replacing an older one) once it exceeds ``limit`` bytes;
    True if it did. Mosquitto appends to its log forever and reopens it on SIGHUP, so rotating
    before a start or a reload keeps at most two files of about ``limit`` each."""
    try:
        if path.stat().st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    os.replace(path, path.with_name(path.name + ".1"))
    return True


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``:
    a reader (Mosquitto on SIGHUP) sees the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
