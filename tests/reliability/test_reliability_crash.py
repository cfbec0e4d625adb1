"""Crash safety: the gateway killed by SIGKILL at each fault point of the enrollment path, and at
a random moment, while devices enroll and renew; restarted, it keeps every promise.

After each run: every certificate a device holds has its row in the registry (none was
delivered without it), no serial appears twice, every device ends enrolled with all its
renewals done, and `fleetgate audit verify` passes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from reliability_support import (
    DeviceRun,
    FieldDevice,
    GatewayProcess,
    fleetgate,
    keep_alive,
    make_home,
)

from gateway.faults import FaultPoint
from gateway.registry import SqlStore
from gateway.store import CertificateStatus
from pki.csr import public_key_fingerprint
from simulators.factory import MODEL

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 5
RENEWALS = 2
# Passes before the kill: mid-stream for each point (5 hellos, 15 CSRs checked and certificates
# signed and written, 20 answers published in all).
NTH = {
    FaultPoint.AFTER_NONCE_ISSUED: 3,
    FaultPoint.AFTER_CSR_VERIFIED: 6,
    FaultPoint.AFTER_SIGNING: 6,
    FaultPoint.AFTER_ROW_WRITTEN: 6,
    FaultPoint.AFTER_PUBLISH: 8,
}


async def run_fleet_through_crashes(
    tmp_path: Path, *, fault: str | None, kill_after_certificates: int | None = None
) -> tuple[GatewayProcess, list[DeviceRun]]:
    settings, factory = make_home(tmp_path / "gw")
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    process = GatewayProcess(settings)
    process.start(fault=fault)
    await asyncio.get_running_loop().run_in_executor(None, process.wait_ready)
    devices = [
        FieldDevice(
            factory.mint(f"crash-{n:02d}", MODEL), ca_pem, settings, renewals=RENEWALS, seed=n
        )
        for n in range(DEVICES)
    ]
    done = asyncio.Event()
    deadline = asyncio.get_running_loop().time() + 60
    watcher = asyncio.create_task(keep_alive(process, done))
    killer = (
        asyncio.create_task(kill_when(process, devices, kill_after_certificates))
        if kill_after_certificates is not None
        else None
    )
    try:
        runs = await asyncio.gather(*(device.go(deadline) for device in devices))
    except AssertionError as error:
        raise AssertionError(f"{error}\n{process.output()}") from None
    finally:
        done.set()
        await watcher
        if killer is not None:
            killer.cancel()
    assert process.stop() == 0, process.output()
    return process, list(runs)


async def kill_when(process: GatewayProcess, devices: list[FieldDevice], count: int) -> None:
    """SIGKILL the gateway once the fleet holds ``count`` certificates: mid-stream, at no
    particular point of any one request."""
    while sum(len(d.run.certificates) for d in devices) < count:
        await asyncio.sleep(0.01)
    process.kill()


def check_promises(process: GatewayProcess, runs: list[DeviceRun]) -> None:
    settings = process.settings
    with SqlStore(settings.database) as store:
        for run in runs:
            assert run.renewals == RENEWALS, (run, process.output())
            assert len(run.certificates) >= RENEWALS + 1
            rows = {row.serial: row for row in store.certificates_for(run.device_id)}
            for certificate in run.certificates:
                row = rows.get(certificate.serial_number)
                assert row is not None, f"{run.device_id} holds an unrecorded certificate"
                assert row.public_key_fingerprint == public_key_fingerprint(
                    certificate.public_key()
                )
            newest = run.certificates[-1].serial_number
            assert rows[newest].status is CertificateStatus.ACTIVE
        serials = [
            row.serial for run in runs for row in store.certificates_for(run.device_id)
        ]
        delivered = [c.serial_number for run in runs for c in run.certificates]
    assert len(serials) == len(set(serials)), "a serial was issued twice"
    duplicates = [s for s, n in Counter(delivered).items() if n > 1]
    assert not duplicates, f"one certificate delivered twice as new: {duplicates}"
    verify = fleetgate("audit", "verify", "--home", str(settings.home), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True


@pytest.mark.parametrize("point", list(FaultPoint), ids=str)
async def test_sigkill_at_a_fault_point_breaks_no_promise(
    tmp_path: Path, point: FaultPoint
) -> None:
    process, runs = await run_fleet_through_crashes(tmp_path, fault=f"{point}:{NTH[point]}")
    # The fault fired: the first run died by SIGKILL, the restarted one stopped cleanly.
    assert process.exit_codes == [-9, 0], process.output()
    check_promises(process, runs)


async def test_gateway_and_embedded_broker_killed_under_load_lose_no_enrollment(
    tmp_path: Path,
) -> None:
    process, runs = await run_fleet_through_crashes(
        tmp_path, fault=None, kill_after_certificates=DEVICES
    )
    assert process.exit_codes == [-9, 0], process.output()
    # Back within 5 s of the kill: measured from the SIGKILL to the new process serving, its
    # own start, not to the devices' return, which follows their jittered backoff.
    (killed_at,) = process.killed_at
    _, restarted_at = process.started_at
    _, serving_again_at = process.serving_at
    back_after = serving_again_at - killed_at
    assert back_after < 5.0, (
        f"gateway serving {back_after:.2f} s after the kill "
        f"(its start took {serving_again_at - restarted_at:.2f} s)"
    )
    check_promises(process, runs)
    # Every device lost its connection and came back, each after its own jittered wait.
    reconnected = [run for run in runs if run.reconnects]
    assert len(reconnected) >= DEVICES - 1
    first_waits = {round(run.reconnect_delays[0], 4) for run in reconnected}
    assert len(first_waits) == len(reconnected), "devices came back in lock-step"
