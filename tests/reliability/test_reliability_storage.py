"""A full disk and a read-only database: requests get the typed ``unavailable`` answer (retry
the same message), the gateway stays up, and it serves again as soon as it can write.

Both conditions are real, not simulated in Python: the registry lives on a small tmpfs that a
filler file fills to the last byte, or its files are made immutable with ``chattr +i`` (as root,
file modes do not stop writes; the immutable flag does). Both need root: CI runs them as root.
Elsewhere they skip, saying which privilege or tool was missing.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import pytest
from reliability_support import FieldDevice, GatewayProcess, fleetgate, make_home

from gateway.registry import SqlStore
from gateway.store import IdentityRecord, IdentityState, StoreError
from pki.profile import IdentityKind
from simulators.factory import MODEL

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


def skip_for_lack_of(need: str, said: str = "") -> NoReturn:
    """Skip, naming what is missing: these tests must not pass quietly without testing."""
    reason = f"needs {need}; CI runs these tests as root (here uid {os.geteuid()})"
    pytest.skip(f"{reason}: {said.strip()}" if said.strip() else reason)


def require_chattr() -> None:
    if shutil.which("chattr") is None:
        skip_for_lack_of("chattr (Debian package e2fsprogs) to make the database immutable")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        skip_for_lack_of("root (CAP_SYS_ADMIN) to mount an 8 MB tmpfs", mounted.stderr)
    try:
        yield mount_point
    finally:
        run("umount", "--lazy", str(mount_point))


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def immutable(paths: list[Path], on: bool) -> None:
    for path in paths:
        done = run("chattr", "+i" if on else "-i", str(path))
        if done.returncode != 0:
            if on:
                skip_for_lack_of(
                    "root (CAP_LINUX_IMMUTABLE) and a file system with the immutable flag "
                    f"(ext4, xfs, btrfs; not tmpfs) under {path.parent} for chattr +i",
                    done.stderr,
                )
            raise AssertionError(done.stderr)


async def outage_then_recovery(
    tmp_path: Path,
    database: Path,
    break_it: Callable[[], None],
    mend_it: Callable[[], None],
) -> None:
    settings, factory = make_home(tmp_path / "gw", database_url=f"sqlite:///{database}")
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    gateway = GatewayProcess(settings)
    gateway.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, gateway.wait_ready)
    try:
        before = FieldDevice(factory.mint("store-before", MODEL), ca_pem, settings, renewals=0)
        await before.go(loop.time() + 30)
        break_it()
        during = FieldDevice(
            factory.mint("store-during", MODEL), ca_pem, settings, renewals=0, seed=1
        )
        task = asyncio.create_task(during.go(loop.time() + 60))
        for _ in range(300):
            if during.run.rejections.count("unavailable") >= 3 or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), f"enrolled on a broken registry: {during.run}"
        assert during.run.rejections.count("unavailable") >= 3, during.run
        assert set(during.run.rejections) == {"unavailable"}
        assert gateway.alive(), gateway.output()
        mend_it()
        try:
            run_after = await task
        except AssertionError as error:
            raise AssertionError(f"{error}\n{gateway.output()}") from None
        assert run_after.certificates, run_after
        assert gateway.alive()
    finally:
        code = gateway.stop()
    assert code == 0, gateway.output()
    with SqlStore(settings.database) as store:
        for device in (before, during):
            serials = {row.serial for row in store.certificates_for(device.run.device_id)}
            assert {c.serial_number for c in device.run.certificates} <= serials
    verify = fleetgate("audit", "verify", "--home", str(settings.home), "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout


async def test_a_full_disk_is_unavailable_then_recovers(tmp_path: Path, small_disk: Path) -> None:
    fillers: list[Path] = []
    await outage_then_recovery(
        tmp_path,
        small_disk / "registry.db",
        lambda: fillers.append(fill(small_disk)),
        lambda: fillers.pop().unlink(),
    )




async def test_a_read_only_database_is_unavailable_then_recovers(tmp_path: Path) -> None:
    """Refused with ``unavailable`` while read-only, the gateway up throughout; it writes
    again as soon as the file is writable, without a restart."""
    require_chattr()
    database = tmp_path / "db" / "registry.db"
    database.parent.mkdir()
    # The -shm file is left writable: SQLite maps it into memory, and a write to an immutable
    # mapping is a SIGBUS, not an error SQLite could report.
    files = [database, database.with_name("registry.db-wal")]
    try:
        await outage_then_recovery(
            tmp_path,
            database,
            lambda: immutable(files, True),
            lambda: immutable(files, False),
        )
    finally:
        for path in files:
            run("chattr", "-i", str(path))


def test_a_registry_opened_while_read_only_writes_again_once_writable(tmp_path: Path) -> None:
    """What a gateway (re)started during a read-only period meets: every connection it opens is
    read-only; once the file is writable again it must write again, without a restart."""
    require_chattr()
    database = tmp_path / "registry.db"
    url = f"sqlite:///{database}"
    with SqlStore(url) as first:
        first.put_identity(identity("before"))
    files = [database, database.with_name("registry.db-wal")]
    try:
        immutable([f for f in files if f.exists()], True)
        with SqlStore(url) as store:
            with pytest.raises(StoreError):
                store.put_identity(identity("during"))
            immutable([f for f in files if f.exists()], False)
            store.put_identity(identity("after"))
            assert store.get_identity("after") is not None
    finally:
        for path in files:
            run("chattr", "-i", str(path))


def identity(name: str) -> IdentityRecord:
    now = datetime.now(UTC)
    return IdentityRecord(
        id=name, kind=IdentityKind.DEVICE, state=IdentityState.ACTIVE, created_at=now,
        updated_at=now,
    )
