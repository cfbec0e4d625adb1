"""A SoftHSM2 token folder of the tests' own (never the user's): where the PKCS#11 module is,
and a config file pointing SoftHSM2 at a fresh token directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


def softhsm_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(the PKCS#11 module, a softhsm2.conf for a new empty token folder); the calling test
    skips where SoftHSM2 is not installed."""
    module = next((m for m in MODULE_CANDIDATES if Path(m).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2)")
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    config = folder / "softhsm2.conf"
    config.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    return module, config
