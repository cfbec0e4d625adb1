"""fleetgate.toml: what init writes loads back; every mistake is a ConfigError naming the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings, parse_settings, render_default_config
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
    ],
)
def test_a_bad_setting_is_named(data: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        parse_settings(Path("/tmp/x"), data)


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
