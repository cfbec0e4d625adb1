"""fleetgate.toml: what init writes loads back; every mistake is a ConfigError naming the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    CaSettings,
    ConfigError,
    load_settings,
    parse_settings,
    pkcs11_pin,
    render_default_config,
)
from pki.keys import KeyType


def test_the_file_init_writes_loads_with_its_values() -> None:
    data = tomllib.loads(render_default_config("plant.example", KeyType.P384))
    settings = parse_settings(Path("/tmp/x"), data)
    assert settings.trust_domain == "plant.example"
    assert settings.ca.key_type is KeyType.P384
    assert settings.certificates.lifetime_seconds == 3600
    assert settings.policy.auto_approve[0].model == "*"


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"colour": "blue"}, "colour"),
        ({"certificates": {"lifetime_seconds": 30}}, "lifetime_seconds"),
        ({"certificates": {"lifetime_seconds": "1h"}}, "lifetime_seconds"),
        ({"certificates": {"renew_fraction": 1.5}}, "renew_fraction"),
        ({"broker": {"kind": "rabbit"}}, "broker.kind"),
        ({"broker": {"operational_port": 70000}}, "operational_port"),
        ({"broker": "embedded"}, "[broker]"),
        ({"ca": {"key_type": "rsa1024"}}, "ca.key_type"),
        ({"enrollment": {"require_known_firmware": "yes"}}, "require_known_firmware"),
        ({"policy": {"firmware": {"TH-200": ["not-a-digest"]}}}, "TH-200"),
        ({"policy": {"auto_approve": [{"vendor": "x"}]}}, "vendor"),
        ({"policy": {"denied_birth_fingerprints": "abc"}}, "denied_birth_fingerprints"),
        ({"trust_domain": "UPPER case"}, "trust_domain"),
        ({"audit_checkpoint_every": 0}, "audit_checkpoint_every"),
        ({"ca": {"crl_validity_hours": 0}}, "crl_validity_hours"),
        ({"ca": {"crl_validity_hours": 24 * 31}}, "crl_validity_hours"),
        ({"ca": {"root_lifetime_days": 0}}, "ca.root_lifetime_days"),
        ({"ca": {"root_lifetime_days": 10**9}}, "ca.root_lifetime_days"),
        ({"ca": {"issuing_lifetime_days": 4000}}, "ca.issuing_lifetime_days"),
        ({"certificates": {"lifetime_seconds": 3_000_000}}, "certificates.lifetime_seconds"),
        ({"certificates": {"renew_jitter": 0.5}}, "certificates.renew_jitter"),
        ({"broker": {"host": ""}}, "broker.host"),
        ({"broker": {"enrollment_port": -1}}, "broker.enrollment_port"),
        ({"broker": {"enrollment_port": 9000, "operational_port": 9000}}, "operational_port"),
        ({"enrollment": {"nonce_ttl_seconds": 0}}, "enrollment.nonce_ttl_seconds"),
        ({"enrollment": {"nonce_ttl_seconds": 7200}}, "enrollment.nonce_ttl_seconds"),
        ({"enrollment": {"max_clock_skew_seconds": -1}}, "enrollment.max_clock_skew_seconds"),
        ({"enrollment": {"max_clock_skew_seconds": 90000}}, "max_clock_skew_seconds"),
        ({"enrollment": {"pending_retry_after": -1}}, "enrollment.pending_retry_after"),
        ({"enrollment": {"pending_retry_after": 0}}, "enrollment.pending_retry_after"),
        ({"enrollment": {"pending_retry_after": 3601}}, "enrollment.pending_retry_after"),
        ({"policy": {"auto_approve": [{"model": ""}]}}, "policy.auto_approve.model"),
        ({"policy": {"auto_approve": ["TH-200"]}}, "policy.auto_approve must be a list of tables"),
        ({"policy": {"auto_approve": {"model": "*"}}}, "policy.auto_approve must be a list of"),
        ({"policy": {"firmware": {"": ["ab" * 32]}}}, "policy.firmware"),
        ({"policy": {"firmware": {"TH-200": ["AB" * 32]}}}, "TH-200"),
        ({"policy": {"denied_birth_fingerprints": ["not-hex"]}}, "denied_birth_fingerprints"),
        ({"trust_domain": "plant..example"}, "trust_domain"),
        ({"trust_domain": "plant.-x"}, "trust_domain"),
        ({"database_url": "mysql://db/fleet"}, "database_url"),
        ({"passphrase_file": ""}, "passphrase_file"),
        ({"ca": {"key_store": "hsm"}}, "ca.key_store"),
        ({"ca": {"key_store": 11}}, "ca.key_store"),
        ({"ca": {"key_store": "pkcs11"}}, "ca.pkcs11_module"),
        ({"ca": {"key_store": "pkcs11", "pkcs11_module": "/nonexistent/libpkcs11.so",
                 "pkcs11_token_label": "fleetgate"}}, "ca.pkcs11_module"),
        ({"ca": {"pkcs11_module": 5}}, "ca.pkcs11_module"),
        ({"ca": {"pkcs11_pin": "1234"}}, "ca.pkcs11_pin"),  # a PIN has no place in the file
    ],
)
def test_a_bad_setting_is_named(data: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        parse_settings(Path("/tmp/x"), data)


def test_the_token_settings_need_a_module_file_and_a_label(tmp_path: Path) -> None:
    module = tmp_path / "libtoken.so"
    module.write_bytes(b"\x7fELF")  # only its existence is checked when the file is read
    table = {"key_store": "pkcs11", "pkcs11_module": str(module), "pkcs11_token_label": "fg"}
    ca = parse_settings(tmp_path, {"ca": table}).ca
    assert ca.uses_token and ca.pkcs11_module == str(module) and ca.pkcs11_token_label == "fg"
    for label in ("", "   "):
        with pytest.raises(ConfigError, match=r"ca\.pkcs11_token_label"):
            parse_settings(tmp_path, {"ca": {**table, "pkcs11_token_label": label}})
    with pytest.raises(ConfigError, match=r"ca\.pkcs11_module must be an absolute path"):
        parse_settings(tmp_path, {"ca": {**table, "pkcs11_module": "libtoken.so"}})
    with pytest.raises(ConfigError, match=r"ca\.pkcs11_module"):
        parse_settings(tmp_path, {"ca": {**table, "pkcs11_module": str(tmp_path)}})  # a folder
    # With the file store the token keys are not read, so a leftover module path is no error.
    kept = {**table, "key_store": "file", "pkcs11_module": "/nonexistent/libpkcs11.so"}
    assert not parse_settings(tmp_path, {"ca": kept}).ca.uses_token
    assert not parse_settings(tmp_path, {}).ca.uses_token


def test_the_file_init_writes_records_the_token(tmp_path: Path) -> None:
    module = tmp_path / "libtoken.so"
    module.write_bytes(b"\x7fELF")
    ca = CaSettings(key_store="pkcs11", pkcs11_module=str(module), pkcs11_token_label='fg "1"')
    text = render_default_config("plant.example", KeyType.P384, None, ca)
    loaded = parse_settings(tmp_path, tomllib.loads(text)).ca
    assert (loaded.key_store, loaded.pkcs11_module, loaded.pkcs11_token_label) == (
        "pkcs11", str(module), 'fg "1"'
    )
    assert "FLEETGATE_PKCS11_PIN" in text and "pin =" not in text.lower()
    plain = tomllib.loads(render_default_config("a.example", KeyType.P256))
    assert parse_settings(tmp_path, plain).ca.key_store == "file"


def test_the_pin_comes_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = CaSettings()
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("FLEETGATE_PKCS11_PIN", raising=False)
        else:
            monkeypatch.setenv("FLEETGATE_PKCS11_PIN", unset)
        with pytest.raises(ConfigError, match=r"\$FLEETGATE_PKCS11_PIN"):
            pkcs11_pin(ca)
    monkeypatch.setenv("FLEETGATE_PKCS11_PIN", "0042-pin")
    assert pkcs11_pin(ca) == "0042-pin"


def test_a_broken_file_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleetgate init"):
        load_settings(tmp_path)
    (tmp_path / "fleetgate.toml").write_text("trust_domain = \n")
    with pytest.raises(ConfigError, match=r"fleetgate\.toml"):
        load_settings(tmp_path)


def test_the_database_url_comes_from_the_environment_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse_settings(tmp_path, {})
    assert settings.database == f"sqlite:///{(tmp_path / 'registry.db').resolve()}"
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", "postgresql://db/fleet")
    assert settings.database == "postgresql://db/fleet"


# (section, key, lowest accepted, highest accepted, the EnrollmentPolicy field it becomes)
POLICY_BOUNDS = [
    ("certificates", "lifetime_seconds", 60, 30 * 86400, "cert_lifetime"),
    ("certificates", "renew_fraction", 0.1, 0.95, "renew_fraction"),
    ("certificates", "renew_jitter", 0.0, 0.2, "renew_jitter"),
    ("enrollment", "nonce_ttl_seconds", 5, 3600, "nonce_ttl"),
    ("enrollment", "max_clock_skew_seconds", 0, 86400, "max_clock_skew"),
    ("enrollment", "pending_retry_after", 1, 3600, "pending_retry_after"),
]


@pytest.mark.parametrize(("section", "key", "low", "high", "field"), POLICY_BOUNDS)
def test_the_settings_accept_exactly_what_the_enrollment_policy_accepts(
    section: str, key: str, low: float, high: float, field: str
) -> None:
    """A value the file accepts never makes the gateway fail at start, and a value the
    gateway would refuse is refused when the file is read, naming its key."""
    from datetime import timedelta

    from gateway.enrollment import EnrollmentPolicy
    from gateway.service import policy_from_settings

    step = 1 if isinstance(low, int) else 0.01
    for value in (low, high):
        settings = parse_settings(Path("/tmp/x"), {section: {key: value}})
        policy_from_settings(settings, ())
    for value in (low - step, high + step):
        with pytest.raises(ConfigError, match=re.escape(f"{section}.{key}")):
            parse_settings(Path("/tmp/x"), {section: {key: value}})
        as_policy: dict[str, Any] = {
            field: timedelta(seconds=value)
            if field in ("cert_lifetime", "nonce_ttl", "max_clock_skew")
            else value
        }
        with pytest.raises(ValueError, match=field):
            EnrollmentPolicy(trust_domain="x.example", trusted_roots=(), **as_policy)


def test_an_unreadable_passphrase_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEETGATE_PASSPHRASE", raising=False)
    (tmp_path / "secrets" / "passphrase").mkdir(parents=True)  # a folder, not a file
    settings = parse_settings(tmp_path, {})
    with pytest.raises(ConfigError, match="passphrase_file"):
        settings.passphrase()


DOCS = Path(__file__).parents[2] / "docs" / "configuration.md"


def documented_keys() -> dict[str, dict[str, str]]:
    """docs/configuration.md as heading -> {key: its default column}, from its tables."""
    sections: dict[str, dict[str, str]] = {}
    rows: dict[str, str] = {}
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            rows = sections.setdefault(line.lstrip("#").strip().strip("`"), {})
        elif found := re.match(r"\| `(\w+)` \| ([^|]*) \|", line):
            rows[found[1]] = found[2]
    return sections


def test_every_setting_is_documented_with_its_default() -> None:
    from dataclasses import fields, is_dataclass

    from gateway.anomaly.settings import AnomalySettings, Thresholds
    from gateway.config import (
        ApprovalRuleSettings,
        BrokerSettings,
        CaSettings,
        CertificateSettings,
        EnrollmentSettings,
        PolicySettings,
        Settings,
    )

    documented = documented_keys()
    tables: dict[str, Any] = {
        "Top level": Settings(home=Path("/tmp/x")),
        "[ca]": CaSettings(),
        "[certificates]": CertificateSettings(),
        "[broker]": BrokerSettings(),
        "[enrollment]": EnrollmentSettings(),
        "[policy]": PolicySettings(),
        "[[policy.auto_approve]]": ApprovalRuleSettings(),
        "[anomaly]": AnomalySettings(),
        "[anomaly.thresholds]": Thresholds(),
    }
    for heading, defaults in tables.items():
        rows = documented.get(heading, {})
        for item in fields(defaults):
            if item.name == "home":
                continue  # --home / $FLEETGATE_HOME, not a key of the file
            if is_dataclass(getattr(defaults, item.name)):  # a table: its own heading
                assert any(h.endswith(f"{item.name}]") for h in documented), item.name
                continue
            assert item.name in rows, f"docs/configuration.md: {heading} lacks {item.name}"
            shown = re.match(r"`([^`]*)`", rows[item.name].strip())
            if shown is None:
                continue  # a table or the default rules, described in words
            value = tomllib.loads(f"v = {shown[1]}")["v"]
            default = getattr(defaults, item.name)
            if isinstance(default, float):
                assert value == pytest.approx(default, abs=1e-3), (heading, item.name)
            else:
                expected = list(default) if isinstance(default, tuple) else default
                assert value == expected, (heading, item.name)


def test_the_environment_variables_are_documented() -> None:
    from gateway.config import DATABASE_ENV, HOME_ENV, PASSPHRASE_ENV, PKCS11_PIN_ENV

    text = DOCS.read_text()
    for name in (HOME_ENV, PASSPHRASE_ENV, DATABASE_ENV, PKCS11_PIN_ENV):
        assert f"`{name}`" in text


def test_the_file_init_writes_points_to_the_page_that_exists() -> None:
    header = render_default_config("plant.example", KeyType.P256).splitlines()[0]
    assert "docs/configuration.md" in header and DOCS.exists()
