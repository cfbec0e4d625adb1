"""`fleetgate operator add|list`: operator certificates, registry rows and console profiles."""

from __future__ import annotations

import dataclasses
import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from gateway.admin import AdminClient, AdminError, load_profile
from gateway.cli import operator
from gateway.config import load_settings
from gateway.home import init_home
from gateway.operations import open_store
from gateway.store import CertificateStatus, IdentityRecord, IdentityState, Store
from pki.clock import SystemClock
from pki.keys import decrypt_private_key
from pki.profile import IdentityKind

runner = CliRunner()
PASSPHRASE = b"profile passphrase 42"


def fleetgate_operator(*args: str) -> tuple[int, str]:
    result = runner.invoke(operator.app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "gw"
    init_home(folder, trust_domain="plant-7.example")
    return folder


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "profile-passphrase"
    path.write_bytes(PASSPHRASE + b"\n")
    return path


def store_of(home: Path) -> Store:
    return open_store(load_settings(home))


def add(home: Path, name: str, role: str, out: Path, *extra: str) -> tuple[int, str]:
    return fleetgate_operator(
        "add", name, "--role", role, "--home", str(home), "--out", str(out), *extra
    )


def test_add_issues_a_certificate_records_the_operator_and_writes_a_private_profile(
    home: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "alice.json"
    code, output = add(
        home, "alice", "operator", out, "--passphrase-file", str(passphrase_file),
        "--lifetime-hours", "2", "--host", "gw.plant-7.example", "--port", "9884",
    )
    assert code == 0, output
    assert "alice" in output and str(out) in output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    profile = load_profile(out)
    assert (profile.name, profile.host, profile.port) == ("alice", "gw.plant-7.example", 9884)
    leaf, issuing = x509.load_pem_x509_certificates(profile.certificate_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://plant-7.example/operator/alice"
    ]
    assert issuing.subject == leaf.issuer
    assert leaf.not_valid_after_utc - SystemClock().now() <= timedelta(hours=2)
    assert leaf.not_valid_after_utc - SystemClock().now() > timedelta(hours=1, minutes=55)
    root = x509.load_pem_x509_certificate((home / "ca" / "root.crt").read_bytes())
    assert root in x509.load_pem_x509_certificates(profile.ca_pem)
    # The key opens with the profile passphrase and belongs to the certificate.
    key = decrypt_private_key(profile.encrypted_key_pem, PASSPHRASE)
    assert key.public_key() == leaf.public_key()
    AdminClient(profile, PASSPHRASE)  # a console can build its TLS context from it
    # The registry knows the operator, its role, its certificate, and who added it.
    store = store_of(home)
    record = store.get_identity("alice")
    assert record is not None
    assert (record.kind, record.state, record.role) == (
        IdentityKind.OPERATOR, IdentityState.ACTIVE, "operator"
    )
    [row] = store.certificates_for("alice")
    assert row.serial == leaf.serial_number and row.status is CertificateStatus.ACTIVE
    [entry] = [r.entry for r in store.audit_records() if r.entry.action == "operator_add"]
    assert entry.subject == "alice" and entry.actor.startswith("cli:")
    assert entry.detail["role"] == "operator" and entry.detail["serial"] == f"{row.serial:x}"


def test_a_generated_passphrase_is_shown_once_and_opens_the_key(
    home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bob.json"
    code, output = add(home, "bob", "viewer", out, "--json")
    assert code == 0, output
    data = json.loads(output.strip().splitlines()[-1])
    assert data["name"] == "bob" and data["role"] == "viewer" and data["reissued"] is False
    passphrase = data["passphrase"].encode()
    decrypt_private_key(load_profile(out).encrypted_key_pem, passphrase)
    code, output = add(home, "carol", "viewer", tmp_path / "carol.json")
    assert code == 0
    assert "warning" in output and "shown once" in output


def test_adding_again_reissues_and_sets_the_role(
    home: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "one.json", tmp_path / "two.json"
    assert add(home, "alice", "viewer", first, "--passphrase-file", str(passphrase_file))[0] == 0
    code, output = add(home, "alice", "admin", second, "--passphrase-file", str(passphrase_file))
    assert code == 0, output
    assert "re-issued" in output
    store = store_of(home)
    assert store.get_identity("alice").role == "admin"
    statuses = sorted(c.status.value for c in store.certificates_for("alice"))
    assert statuses == ["active", "superseded"]
    new_leaf = x509.load_pem_x509_certificates(load_profile(second).certificate_pem)[0]
    [active] = [c for c in store.certificates_for("alice") if c.status is CertificateStatus.ACTIVE]
    assert active.serial == new_leaf.serial_number


def test_an_existing_profile_file_is_kept_unless_forced(
    home: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "alice.json"
    out.write_text("precious")
    code, output = add(home, "alice", "viewer", out, "--passphrase-file", str(passphrase_file))
    assert code == 1 and "--force" in output
    assert out.read_text() == "precious"
    assert store_of(home).get_identity("alice") is None
    code, _ = add(
        home, "alice", "viewer", out, "--passphrase-file", str(passphrase_file), "--force"
    )
    assert code == 0 and load_profile(out).name == "alice"


def _put(home: Path, record: IdentityRecord) -> None:
    store_of(home).put_identity(record)


@pytest.mark.parametrize(
    ("name", "setup", "message"),
    [
        ("bad/name", None, "not a valid operator name"),
        ("dev-1", "device", "already a device"),
        ("gone", "revoked", "revoked for good"),
    ],
)
def test_add_refuses_names_it_cannot_use(
    home: Path, passphrase_file: Path, tmp_path: Path, name: str, setup: str | None, message: str
) -> None:
    now = SystemClock().now()
    if setup == "device":
        _put(home, IdentityRecord(name, IdentityKind.DEVICE, IdentityState.ACTIVE, now, now))
    elif setup == "revoked":
        record = IdentityRecord(name, IdentityKind.OPERATOR, IdentityState.ACTIVE, now, now)
        _put(home, dataclasses.replace(record, role="admin"))
        store_of(home).change_state(name, IdentityState.REVOKED, now)
    out = tmp_path / "p.json"
    code, output = add(home, name, "viewer", out, "--passphrase-file", str(passphrase_file))
    assert code == 1
    assert message in " ".join(output.split())
    assert not out.exists()
    assert store_of(home).certificates_for(name) == []


def test_add_needs_the_ca_passphrase(
    home: Path, passphrase_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETGATE_PASSPHRASE", raising=False)
    (home / "secrets" / "passphrase").unlink()
    code, output = add(
        home, "alice", "viewer", tmp_path / "p.json", "--passphrase-file", str(passphrase_file)
    )
    assert code == 1 and "passphrase" in output
    assert store_of(home).get_identity("alice") is None


def test_a_wrong_ca_passphrase_is_refused(
    home: Path, passphrase_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "not the right one")
    code, output = add(
        home, "alice", "viewer", tmp_path / "p.json", "--passphrase-file", str(passphrase_file)
    )
    assert code == 1 and "wrong_passphrase" in output
    assert store_of(home).get_identity("alice") is None


@pytest.mark.parametrize(
    ("content", "message"), [(b"short\n", "at least 8"), (None, "cannot read")]
)
def test_a_bad_profile_passphrase_file_is_refused(
    home: Path, tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "pp"
    if content is not None:
        path.write_bytes(content)
    code, output = add(home, "alice", "viewer", tmp_path / "p.json", "--passphrase-file", str(path))
    assert code == 1 and message in output
    assert store_of(home).get_identity("alice") is None


@pytest.mark.parametrize(
    "extra",
    [
        ("--role", "root"),
        ("--role", "viewer", "--lifetime-hours", "0"),
        ("--role", "viewer", "--lifetime-hours", "1000"),
        ("--role", "viewer", "--port", "70000"),
    ],
)
def test_bad_options_are_usage_errors(home: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    code, _ = fleetgate_operator(
        "add", "alice", *extra, "--home", str(home), "--out", str(tmp_path / "p.json")
    )
    assert code == 2
    assert store_of(home).get_identity("alice") is None


def test_the_profile_passphrase_is_not_the_key(
    home: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "alice.json"
    assert add(home, "alice", "viewer", out, "--passphrase-file", str(passphrase_file))[0] == 0
    with pytest.raises(AdminError) as caught:
        AdminClient(load_profile(out), b"guessed passphrase")
    assert caught.value.reason == "wrong_passphrase"


def test_list_shows_operators_with_role_state_and_expiry(
    home: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    for name, role in (("bob", "viewer"), ("alice", "admin")):
        code, _ = add(
            home, name, role, tmp_path / f"{name}.json", "--passphrase-file", str(passphrase_file)
        )
        assert code == 0
    code, output = fleetgate_operator("list", "--home", str(home), "--json")
    assert code == 0
    rows = json.loads(output)
    assert [(r["name"], r["role"], r["state"]) for r in rows] == [
        ("alice", "admin", "active"),
        ("bob", "viewer", "active"),
    ]
    assert all(r["certificate_not_after"] for r in rows)
    code, output = fleetgate_operator("list", "--home", str(home))
    assert code == 0 and "alice" in output and "2 operators" in output
