"""`fleetgate console` before any network: which profile, which passphrase, and the errors an
operator sees when either is wrong. Also the table benchmark's report."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from console.app import default_profile_path, passphrase_opens, read_passphrase_file
from console.errors import ConsoleError, ConsoleReason
from gateway.admin.profile import Profile
from gateway.bench_console import render_console_bench, run_console_bench
from gateway.cli.console_app import console_command
from gateway.home import pem
from pki.ca import create_root_ca
from pki.clock import SystemClock
from pki.issue import Issuer
from pki.keys import LocalSigner, encrypt_private_key
from pki.profile import IdentityKind, LeafTemplate

RIGHT = b"the-right-passphrase"


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    """A well-formed profile for a gateway nobody runs: enough to get past the passphrase."""
    clock = SystemClock()
    root = create_root_ca(LocalSigner.generate(), "Test Root", clock)
    key = LocalSigner.generate()
    certificate = Issuer(root, clock).issue(
        LeafTemplate(IdentityKind.OPERATOR, "op-test", "fleet.test", timedelta(hours=1)),
        key.public_key(),
    )
    profile = Profile(
        name="op-test",
        host="127.0.0.1",
        port=1,
        ca_pem=pem(root.certificate),
        certificate_pem=pem(certificate),
        encrypted_key_pem=encrypt_private_key(key, RIGHT),
    )
    path = tmp_path / "op-test.profile.json"
    path.write_bytes(profile.to_json())
    return path


def invoke(*args: str):
    app = typer.Typer()
    app.command()(console_command)
    return CliRunner().invoke(app, list(args))


def test_a_missing_profile_is_reported_with_its_reason(tmp_path: Path) -> None:
    result = invoke("--profile", str(tmp_path / "nope.json"), "--screenshot", "x.png")
    assert result.exit_code == 2
    assert "profile_unreadable" in result.output


def test_a_file_that_is_not_a_profile_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "junk.json"
    path.write_text('{"hello": 1}')
    result = invoke("--profile", str(path))
    assert result.exit_code == 2
    assert "profile_malformed" in result.output


def test_a_wrong_passphrase_file_stops_before_any_window(profile_file: Path, tmp_path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not-the-passphrase\n")
    result = invoke("--profile", str(profile_file), "--passphrase-file", str(wrong))
    assert result.exit_code == 2
    assert "wrong passphrase" in result.output


def test_an_empty_or_missing_passphrase_file_is_reported(profile_file: Path, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    result = invoke("--profile", str(profile_file), "--passphrase-file", str(empty))
    assert result.exit_code == 2 and "is empty" in result.output
    with pytest.raises(ConsoleError) as caught:
        read_passphrase_file(tmp_path / "absent")
    assert caught.value.reason is ConsoleReason.PASSPHRASE_MISSING


def test_the_passphrase_file_loses_only_its_line_end(profile_file: Path, tmp_path) -> None:
    from gateway.admin.profile import load_profile

    path = tmp_path / "pass"
    path.write_bytes(RIGHT + b"\r\n")
    assert read_passphrase_file(path) == RIGHT
    assert passphrase_opens(load_profile(profile_file), RIGHT)
    assert not passphrase_opens(load_profile(profile_file), RIGHT + b" ")


def test_the_default_profile_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEETGATE_PROFILE", str(tmp_path / "mine.json"))
    assert default_profile_path() == tmp_path / "mine.json"
    monkeypatch.delenv("FLEETGATE_PROFILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_profile_path() == tmp_path / "config" / "fleetgate" / "console.json"


def test_the_table_benchmark_reports_its_figures(qapp) -> None:
    result = run_console_bench(2000)
    assert result["devices"] == 2000
    for key in ("parse_s", "load_s", "filter_ms", "sort_ms", "live_update_ms"):
        assert result[key] >= 0
    assert 0 < result["filter_shown"] < 2000
    assert result["qt_platform"] == "offscreen"
    assert render_console_bench(result).row_count >= 8


@pytest.mark.parametrize("devices", [0, -5, True, 2.5])
def test_the_table_benchmark_refuses_a_bad_size(devices) -> None:
    with pytest.raises(ValueError):
        run_console_bench(devices)
