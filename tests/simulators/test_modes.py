"""Each simulation mode against a real gateway: what the gateway does to the devices."""

from __future__ import annotations

import pytest
from simulators_support import mode_options

from gateway.store import IdentityState
from simulators.modes import Mode, ModeOptions, run_mode

pytestmark = pytest.mark.broker


async def test_normal_mode_keeps_the_fleet_summary_and_adds_what_the_gateway_did(
    start_gateway,
) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(
        mode_options(gateway, Mode.NORMAL, 2, duration=3.0, telemetry_interval=0.5), factory
    )
    result = summary.as_dict()
    for key in ("devices", "enrolled", "pending", "failed", "renewed", "reattested",
                "telemetry", "rejected", "seconds"):
        assert key in result
    assert result["mode"] == "normal"
    assert result["enrolled"] == 2 and result["failed"] == 0
    assert result["telemetry"] > 0
    assert result["quarantined"] == 0 and result["cut"] == 0


async def test_replay_gets_the_stored_answer_and_no_second_certificate(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(mode_options(gateway, Mode.REPLAY, 2), factory)
    assert summary.details == {"same_answer": 2, "second_certificates": 0}
    # Under a new request id the captured enroll is refused: its key was certified already
    # (checked before the nonce). A fresh enroll for the spent challenge: nonce_reused.
    assert summary.rejected == {"key_reused": 2, "nonce_reused": 2}
    for identity in gateway.store.list_identities():
        assert len(gateway.store.certificates_for(identity.id)) == 1


async def test_a_clone_from_another_address_is_refused_and_quarantined(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(mode_options(gateway, Mode.CLONE, 1), factory)
    assert summary.enrolled == 1
    assert summary.refused == {"clone_session": 1}  # the embedded broker refuses the second
    assert summary.quarantined == 1
    [identity] = gateway.store.list_identities()
    assert identity.state is IdentityState.QUARANTINED


async def test_a_clone_on_mosquitto_is_quarantined_and_both_sessions_end(start_gateway) -> None:
    gateway, factory = await start_gateway("mosquitto")
    summary = await run_mode(mode_options(gateway, Mode.CLONE, 1), factory)
    # Mosquitto lets the second session take over (the first is cut); the quarantine follows,
    # and once it is in force the gateway cuts the newcomer too.
    assert summary.cut == 2
    assert summary.quarantined == 1
    [identity] = gateway.store.list_identities()
    assert identity.state is IdentityState.QUARANTINED


async def test_rogue_manufacturer_devices_are_refused_for_good(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(mode_options(gateway, Mode.ROGUE, 2), factory)
    assert summary.rejected == {"unknown_manufacturer": 2}
    assert summary.failed == 2 and summary.enrolled == 0
    assert gateway.store.list_identities() == []


async def test_tampered_firmware_is_refused(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(mode_options(gateway, Mode.TAMPER, 2), factory)
    assert summary.rejected == {"firmware_not_allowed": 2}
    assert summary.failed == 2 and summary.enrolled == 0


async def test_a_prober_reaches_no_other_device(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(mode_options(gateway, Mode.PROBER, 2), factory)
    assert summary.enrolled == 2
    assert summary.details["leaked"] == 0
    assert summary.denied["subscribe"] == 7
    assert summary.denied["publish"] == 4
    assert summary.details["attempts"] == 11


async def test_flood_reports_the_slowdown_of_the_other_devices(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_mode(
        mode_options(gateway, Mode.FLOOD, 2, flood_rounds=1, flood_parallel=4), factory
    )
    details = summary.details
    assert details["flood_sent"] > 0
    assert summary.enrolled == 4  # the others enroll, storm or not
    assert details["baseline_p50_ms"] > 0 and details["flood_p50_ms"] > 0
    assert isinstance(details["slowdown_pct"], float)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"devices": 0}, ValueError),
        ({"devices": "3"}, TypeError),
        ({"mode": Mode.PROBER, "devices": 1}, ValueError),
        ({"mode": "chaos"}, ValueError),
        ({"flood_parallel": 0}, ValueError),
        ({"flood_rounds": 0}, ValueError),
    ],
)
def test_bad_mode_options_are_refused(changes: dict, error: type[Exception]) -> None:
    base = {
        "mode": Mode.NORMAL,
        "devices": 2,
        "host": "127.0.0.1",
        "enrollment_port": 8883,
        "operational_port": 8884,
        "ca_pem": b"-----BEGIN CERTIFICATE-----\n",
    }
    with pytest.raises(error):
        ModeOptions(**{**base, **changes})
