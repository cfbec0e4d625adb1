"""Writing the broker's files so that Mosquitto never reads half of one."""

from __future__ import annotations

import os
from pathlib import Path

# re-exported: the broker writes its files with it
from gateway.files import write_atomic

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
