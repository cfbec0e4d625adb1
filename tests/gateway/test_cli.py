"""The `fleetgate` command as an operator uses it (typer's runner, real files, real SQLite)."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import load_settings
from gateway.home import load_keys
from gateway.operations import open_store
from gateway.store import IdentityState
from pki.errors import KeyStoreError

runner = CliRunner()


def fleetgate(*args: str, input: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "gw"
    code, output = fleetgate("init", "--home", str(folder), "--trust-domain", "plant-7.example")
    assert code == 0, output
    return folder


def curve_of(certificate: x509.Certificate) -> str | None:
    key = certificate.public_key()
    return key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_with_encrypted_keys_and_settings(home: Path) -> None:
    root = x509.load_pem_x509_certificate((home / "ca" / "root.crt").read_bytes())
    issuing = x509.load_pem_x509_certificate((home / "ca" / "issuing.crt").read_bytes())
    assert issuing.issuer == root.subject
    for key in ("root", "issuing", "audit"):
        path = home / "ca" / f"{key}.key"
        assert mode(path) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert mode(home / "secrets" / "passphrase") == 0o600
    settings = load_settings(home)
    assert settings.trust_domain == "plant-7.example"


def test_init_says_where_the_generated_passphrase_is(tmp_path: Path) -> None:
    code, output = fleetgate("init", "--home", str(tmp_path / "gw"))
    assert code == 0
    assert "passphrase" in output and "generated" in output


def test_init_refuses_to_overwrite_a_ca(home: Path) -> None:
    before = (home / "ca" / "root.crt").read_bytes()
    code, output = fleetgate("init", "--home", str(home))
    assert code == 1 and "already has a CA" in output
    assert (home / "ca" / "root.crt").read_bytes() == before
    code, _ = fleetgate("init", "--home", str(home), "--force")
    assert code == 0
    assert (home / "ca" / "root.crt").read_bytes() != before


def test_init_with_a_passphrase_file_and_p384(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("correct horse battery staple\n")
    folder = tmp_path / "gw"
    code, output = fleetgate(
        "init", "--home", str(folder), "--key-type", "p384", "--passphrase-file", str(secret)
    )
    assert code == 0, output
    assert not (folder / "secrets" / "passphrase").exists()
    root = x509.load_pem_x509_certificate((folder / "ca" / "root.crt").read_bytes())
    assert curve_of(root) == "secp384r1"
    # The gateway finds the file again from fleetgate.toml alone: no option, no variable.
    keys = load_keys(load_settings(folder))
    assert keys.issuing.certificate.issuer == root.subject


def test_init_encrypts_with_the_passphrase_variable_when_it_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "from the environment")
    folder = tmp_path / "gw"
    code, output = fleetgate("init", "--home", str(folder))
    assert code == 0, output
    assert "FLEETGATE_PASSPHRASE" in output
    assert not (folder / "secrets" / "passphrase").exists()
    load_keys(load_settings(folder))  # opens with the variable the gateway will run with
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "something else")
    with pytest.raises(KeyStoreError):
        load_keys(load_settings(folder))


def test_init_refuses_a_passphrase_file_the_variable_would_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("from the file\n")
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "from the environment")
    args = ("init", "--home", str(tmp_path / "gw"), "--passphrase-file", str(secret))
    code, output = fleetgate(*args)
    assert code == 1 and "differs" in output
    assert not (tmp_path / "gw" / "ca" / "root.crt").exists()
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "from the file")
    code, output = fleetgate(*args)
    assert code == 0, output
    load_keys(load_settings(tmp_path / "gw"))


def test_init_on_a_half_made_home_refuses_and_keeps_the_passphrase(home: Path) -> None:
    (home / "ca" / "root.crt").unlink()
    passphrase = (home / "secrets" / "passphrase").read_bytes()
    issuing_key = (home / "ca" / "issuing.key").read_bytes()
    code, output = fleetgate("init", "--home", str(home))
    assert code == 1 and "part of an earlier CA" in output
    assert "Traceback" not in output
    assert (home / "secrets" / "passphrase").read_bytes() == passphrase
    assert (home / "ca" / "issuing.key").read_bytes() == issuing_key


def test_init_force_replaces_the_ca_but_keeps_the_operators_settings(home: Path) -> None:
    config = home / "fleetgate.toml"
    edited = config.read_text().replace("lifetime_seconds = 3600", "lifetime_seconds = 600")
    config.write_text(edited)
    code, output = fleetgate("init", "--home", str(home), "--force")
    assert code == 0, output
    assert config.read_text() == edited
    assert load_settings(home).certificates.lifetime_seconds == 600
    load_keys(load_settings(home))  # the new keys open with the new generated passphrase


def write_settings(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "fleetgate.toml").write_text(text)


def root_of(home: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((home / "ca" / "root.crt").read_bytes())


def test_init_force_refuses_options_the_kept_settings_contradict(home: Path) -> None:
    # fleetgate.toml is kept on --force and the gateway issues in its trust domain: a CA made
    # for another domain or key type would not be what the operator asked for
    before = {path.name: path.read_bytes() for path in (home / "ca").iterdir()}
    for option, value, key in (
        ("--trust-domain", "beta.example", "trust_domain"),
        ("--key-type", "p384", "ca.key_type"),
    ):
        code, output = fleetgate("init", "--home", str(home), "--force", option, value)
        assert code == 1, output
        said = one_line(output)
        assert f"has {key} = " in said and f"not '{value}'" in said and option in said
        assert "Traceback" not in output
    assert {path.name: path.read_bytes() for path in (home / "ca").iterdir()} == before
    code, output = fleetgate(
        "init", "--home", str(home), "--force", "--trust-domain", "plant-7.example",
        "--key-type", "p256",
    )  # fmt: skip
    assert code == 0, output  # the options the file agrees with
    assert "kept as it was" in output


def test_init_takes_the_trust_domain_and_key_type_of_a_file_written_before(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "gw"
    write_settings(folder, 'trust_domain = "alpha.example"\n[ca]\nkey_type = "p384"\n')
    code, output = fleetgate("init", "--home", str(folder))
    assert code == 0, output
    root = root_of(folder)
    assert "alpha.example" in root.subject.rfc4514_string()
    assert curve_of(root) == "secp384r1"
    code, output = fleetgate("init", "--home", str(folder), "--force")
    assert code == 0, output
    assert "alpha.example" in root_of(folder).subject.rfc4514_string()


def test_init_reads_a_passphrase_file_at_the_generated_passphrase_path(tmp_path: Path) -> None:
    folder = tmp_path / "gw"
    secret = folder / "secrets" / "passphrase"
    secret.parent.mkdir(parents=True)
    secret.write_text("chosen by the operator\n")
    code, output = fleetgate("init", "--home", str(folder), "--passphrase-file", str(secret))
    assert code == 0, output  # given, not generated: nothing of an earlier CA to lose
    assert secret.read_text() == "chosen by the operator\n"
    assert "recorded in" in one_line(output)
    load_keys(load_settings(folder))
    # Without the option the passphrase would be generated over it: refused.
    (folder / "ca").rename(tmp_path / "old-ca")
    code, output = fleetgate("init", "--home", str(folder))
    assert code == 1 and "part of an earlier CA" in output
    assert secret.read_text() == "chosen by the operator\n"


def test_init_says_recorded_only_when_it_wrote_the_settings(home: Path, tmp_path: Path) -> None:
    config = home / "fleetgate.toml"
    before = config.read_text()
    secret = tmp_path / "pass"
    secret.write_text("another passphrase\n")
    code, output = fleetgate(
        "init", "--home", str(home), "--force", "--passphrase-file", str(secret)
    )
    assert code == 0, output
    said = one_line(output)
    assert "recorded in" not in said and config.read_text() == before
    assert "keeps passphrase_file" in said  # and it says what to change


def test_init_with_an_unwritable_home_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, output = fleetgate("init", "--home", str(blocker / "gw"))
    assert code == 1 and "cannot write the gateway home" in output
    assert "Traceback" not in output


def test_home_defaults_to_the_variable_then_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEETGATE_HOME", str(tmp_path / "from-env"))
    assert fleetgate("init")[0] == 0
    assert (tmp_path / "from-env" / "ca" / "root.crt").exists()
    monkeypatch.delenv("FLEETGATE_HOME")
    assert fleetgate("init")[0] == 0
    assert (tmp_path / ".fleetgate" / "ca" / "root.crt").exists()


def test_init_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    code, output = fleetgate("init", "--home", str(tmp_path / "gw"), "--trust-domain", "Bad Name")
    assert code == 1 and "trust_domain" in output


def test_commands_on_a_missing_home_say_to_run_init(tmp_path: Path) -> None:
    code, output = fleetgate("device", "list", "--home", str(tmp_path / "nowhere"))
    assert code == 1 and "fleetgate init" in output


def test_token_create_prints_a_token_and_audits_it(home: Path) -> None:
    code, output = fleetgate("token", "create", "--device-id", "cam-9", "--ttl", "5m",
                             "--home", str(home), "--json")
    assert code == 0, output
    data = json.loads(output)
    assert data["device_id"] == "cam-9" and data["ttl_seconds"] == 300 and len(data["token"]) >= 22
    code, output = fleetgate("audit", "tail", "--home", str(home), "--json")
    assert [e["action"] for e in json.loads(output)] == ["token_create"]


def test_token_create_refuses_a_bad_device_id_and_ttl(home: Path) -> None:
    code, output = fleetgate("token", "create", "--device-id", "a/b", "--home", str(home))
    assert code == 1 and "not a valid device id" in output
    code, output = fleetgate("token", "create", "--device-id", "cam-9", "--ttl", "soon",
                             "--home", str(home))
    assert code == 2 and "duration" in output


def seed_device(home: Path, device_id: str, state: IdentityState) -> None:
    """A device record as enrollment leaves it (the CLI only reads and changes states)."""
    from datetime import UTC, datetime

    from gateway.store import AuditEntry, IdentityRecord
    from pki.profile import IdentityKind

    now = datetime.now(UTC)
    store = open_store(load_settings(home))
    store.put_identity(
        IdentityRecord(id=device_id, kind=IdentityKind.DEVICE, state=state,
                       created_at=now, updated_at=now, model="TH-200"),
        audit=[AuditEntry(actor=f"device:{device_id}", action="enroll", subject=device_id,
                          outcome="pending", at=now)],
    )


def test_approve_quarantine_release_and_revoke_a_device(home: Path) -> None:
    seed_device(home, "th-1", IdentityState.PENDING)
    assert fleetgate("device", "approve", "th-1", "--home", str(home))[0] == 0
    assert fleetgate("device", "quarantine", "th-1", "--reason", "odd traffic",
                     "--home", str(home))[0] == 0
    assert fleetgate("device", "release", "th-1", "--home", str(home))[0] == 0
    # Revoke asks first; anything but yes leaves the device alone.
    code, output = fleetgate("device", "revoke", "th-1", "--reason", "stolen",
                             "--home", str(home), input="n\n")
    assert code == 1 and "not revoked" in output
    assert fleetgate("device", "revoke", "th-1", "--reason", "stolen", "--yes",
                     "--home", str(home))[0] == 0
    code, output = fleetgate("device", "show", "th-1", "--home", str(home), "--json")
    shown = json.loads(output)
    assert shown["state"] == "revoked"
    assert [h["action"] for h in shown["history"]] == [
        "enroll", "approve", "quarantine", "release", "revoke"
    ]
    assert shown["history"][2]["reasons"] == ["odd traffic"]
    # Revoked is final.
    code, output = fleetgate("device", "release", "th-1", "--home", str(home))
    assert code == 1 and "revoked" in output


def test_approve_refuses_unknown_and_non_pending_devices(home: Path) -> None:
    code, output = fleetgate("device", "approve", "ghost", "--home", str(home))
    assert code == 1 and "no identity" in output
    seed_device(home, "th-2", IdentityState.ACTIVE)
    code, output = fleetgate("device", "approve", "th-2", "--home", str(home))
    assert code == 1 and "not pending" in output


def test_device_list_json(home: Path) -> None:
    seed_device(home, "th-3", IdentityState.ACTIVE)
    code, output = fleetgate("device", "list", "--home", str(home), "--json")
    assert code == 0
    [row] = json.loads(output)
    assert row["id"] == "th-3" and row["state"] == "active" and row["model"] == "TH-200"


def test_audit_verify_passes_then_names_an_edited_record(home: Path) -> None:
    seed_device(home, "th-4", IdentityState.PENDING)
    fleetgate("device", "approve", "th-4", "--home", str(home))
    code, output = fleetgate("audit", "verify", "--home", str(home), "--json")
    assert code == 0 and json.loads(output)["ok"] is True
    db = sqlite3.connect(home / "registry.db")
    tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
    audit_table = next(t for t in tables if "audit" in t and "checkpoint" not in t)
    db.execute(f"update {audit_table} set actor = 'operator:mallory' where seq = 2")
    db.commit()
    db.close()
    code, output = fleetgate("audit", "verify", "--home", str(home), "--json")
    verdict = json.loads(output)
    assert code == 1 and verdict["ok"] is False and verdict["first_bad_seq"] == 2


def test_bench_pki_prints_both_rates_and_their_ratio() -> None:
    code, output = fleetgate("bench", "pki", "--count", "50", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["count"] == 50
    assert result["pki_per_s"] > 0 and result["bare_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pki_per_s"] / result["bare_per_s"], rel=0.01)


def test_run_with_a_wrong_passphrase_says_so_without_a_traceback(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETGATE_PASSPHRASE", "not the passphrase")
    code, output = fleetgate("run", "--home", str(home))
    assert code == 1
    assert "cannot open the gateway's keys" in output and "passphrase" in output
    assert "Traceback" not in output and "PRIVATE KEY" not in output


def test_device_show_lists_what_the_behaviour_watch_found(home: Path) -> None:
    from datetime import UTC, datetime

    from gateway.anomaly import Action, Detection, DetectionKind, Verdict
    from gateway.watch import verdict_audit_entry

    seed_device(home, "th-7", IdentityState.ACTIVE)
    detection = Detection(
        "th-7", DetectionKind.PROBING, 1.0, "3 denied attempts on other devices' topics in 300 s",
        datetime.now(UTC), {"denials": 3, "topics": "fg/v1/dev/th-8/telemetry"},
    )  # fmt: skip
    store = open_store(load_settings(home))
    store.append_audit([verdict_audit_entry(Verdict(detection, Action.QUARANTINE, "probing"))])
    code, output = fleetgate("device", "show", "th-7", "--home", str(home), "--json")
    assert code == 0, output
    (found,) = json.loads(output)["detections"]
    assert (found["detection"], found["action"], found["rule"], found["score"]) == (
        "probing", "quarantine", "probing", "1.00"
    )
    assert found["reason"].startswith("3 denied attempts")
    assert "denials=3" in found["evidence"]
    code, output = fleetgate("device", "show", "th-7", "--home", str(home))
    assert code == 0 and "detections" in output and "probing" in output


def set_broker_ports(home: Path, **ports: int) -> None:
    config = home / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data["broker"].update(ports)
    config.write_text(tomli_w.dumps(data))


def one_line(text: str) -> str:
    """The output without rich's line wrapping."""
    return " ".join(text.split())


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


HAVE_MOSQUITTO = shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


@pytest.mark.parametrize(
    "broker",
    [
        "embedded",
        pytest.param(
            "mosquitto",
            marks=pytest.mark.skipif(not HAVE_MOSQUITTO, reason="mosquitto is not installed"),
        ),
    ],
)
def test_run_on_a_busy_port_names_the_port_and_its_setting(
    home: Path, held_port: int, broker: str
) -> None:
    set_broker_ports(home, enrollment_port=0, operational_port=held_port)
    result = runner.invoke(app, ["run", "--home", str(home), "--broker", broker])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception  # not the OSError
    said = one_line(result.output)
    assert f"port {held_port} on 127.0.0.1 is already in use" in said
    assert "broker.operational_port" in said and "fleetgate.toml" in said
    assert "broker.enrollment_port" not in said  # port 0: the system picked a free one


def test_demo_on_a_busy_port_names_its_option(home: Path, held_port: int) -> None:
    result = runner.invoke(
        app,
        ["demo", "--home", str(home), "--enrollment-port", str(held_port),
         "--operational-port", "0", "--devices", "1", "--duration", "1"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    said = one_line(result.output)
    assert f"port {held_port} on 127.0.0.1 is already in use (set by --enrollment-port)" in said


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--enrollment-port", "70000"], "--enrollment-port"),
        (["--operational-port", "-1"], "--operational-port"),
        (["--enrollment-port", "9000", "--operational-port", "9000"], "must differ"),
        (["--devices", "0"], "--devices"),
        (["--cert-lifetime", "30"], "--cert-lifetime"),
    ],
)
def test_demo_refuses_bad_options_before_starting(
    tmp_path: Path, options: list[str], named: str
) -> None:
    folder = tmp_path / "never-made"
    code, output = fleetgate("demo", "--home", str(folder), *options)
    assert code == 1 and named in output
    assert not folder.exists()  # refused before initialising anything


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("certificates", "lifetime_seconds", 3_000_000),
        ("enrollment", "nonce_ttl_seconds", 0),
        ("enrollment", "pending_retry_after", -1),
    ],
)
def test_run_and_demo_name_an_out_of_range_setting(
    home: Path, section: str, key: str, value: int
) -> None:
    config = home / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data[section][key] = value
    config.write_text(tomli_w.dumps(data))
    for command in ("run", "demo"):
        result = runner.invoke(app, [command, "--home", str(home)])
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        assert f"{section}.{key} must lie between" in one_line(result.output)


def test_run_with_an_unreadable_registry_url_says_so(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --database becomes this process's $FLEETGATE_DATABASE_URL: recorded here to be restored
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", "")
    result = runner.invoke(app, ["run", "--home", str(home), "--database", "mysql://db/fleet"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "sqlite:///PATH or postgresql://" in one_line(result.output)


def test_run_on_an_address_not_of_this_machine_says_it_cannot_listen(home: Path) -> None:
    config = home / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data["broker"].update(host="192.0.2.1", enrollment_port=0, operational_port=0)  # TEST-NET-1
    config.write_text(tomli_w.dumps(data))
    result = runner.invoke(app, ["run", "--home", str(home)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    said = one_line(result.output)
    assert "cannot listen on 192.0.2.1" in said and "broker.enrollment_port" in said


def token_settings(tmp_path: Path) -> str:
    """[ca] naming a token: only the module file's existence is checked until it is opened."""
    module = tmp_path / "libtoken.so"
    module.write_bytes(b"\x7fELF")
    return (
        f'[ca]\nkey_store = "pkcs11"\npkcs11_module = "{module}"\n'
        'pkcs11_token_label = "fleetgate"\n'
    )


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ("[certificates]\nlifetime_seconds = 5\n", "certificates.lifetime_seconds must lie"),
        (None, "no PKCS#11 PIN"),
    ],
)
def test_demo_on_a_home_with_only_settings_names_what_stops_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: str | None, said: str
) -> None:
    monkeypatch.delenv("FLEETGATE_PKCS11_PIN", raising=False)
    folder = tmp_path / "gw"
    write_settings(folder, settings if settings is not None else token_settings(tmp_path))
    result = runner.invoke(app, ["demo", "--home", str(folder), "--devices", "1"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert said in one_line(result.output)
    assert not (folder / "ca").exists()  # refused before anything was written


def test_demo_on_an_unwritable_home_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["demo", "--home", str(blocker / "gw"), "--devices", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "cannot write the gateway home" in one_line(result.output)


def test_broker_without_the_token_pin_says_so(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETGATE_PKCS11_PIN", raising=False)
    config = home / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data["ca"].update(tomllib.loads(token_settings(tmp_path))["ca"])
    config.write_text(tomli_w.dumps(data))
    result = runner.invoke(app, ["broker", "--home", str(home)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    said = one_line(result.output)
    assert "cannot open the gateway's keys: no PKCS#11 PIN" in said


def test_a_start_that_times_out_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    import typer

    from gateway.cli.run import _start_or_fail

    stopped: list[bool] = []

    async def start() -> None:
        raise TimeoutError()  # what asyncio.wait_for raises: no message of its own

    async def stop() -> None:
        stopped.append(True)

    with pytest.raises(typer.Exit):
        asyncio.run(_start_or_fail(start, stop, "127.0.0.1", {}))
    assert "cannot start the gateway: TimeoutError" in one_line(capsys.readouterr().err)
    assert stopped == [True]
