"""`fleetgate.toml`: the gateway's settings, parsed once into frozen values.

Every setting has a default, so a file written by `fleetgate init` can stay short; a wrong type,
an unknown key or an out-of-range value is a `ConfigError` naming the key, never a traceback
from deep inside the service.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from gateway.anomaly.settings import AnomalySettings, AnomalySettingsError
from gateway.enrollment.policy import (
    MAX_CERT_LIFETIME,
    MAX_CLOCK_SKEW_RANGE,
    MAX_PENDING_RETRY_AFTER,
    NONCE_TTL_RANGE,
    SHA256_HEX,  # the digests the policy itself accepts
)
from pki.keys import KeyType
from pki.profile import IDENTITY_NAME_PATTERN, MIN_LEAF_LIFETIME, check_trust_domain

CONFIG_NAME = "fleetgate.toml"
DEFAULT_TRUST_DOMAIN = "fleetgate.local"
HOME_ENV = "FLEETGATE_HOME"
PASSPHRASE_ENV = "FLEETGATE_PASSPHRASE"
DATABASE_ENV = "FLEETGATE_DATABASE_URL"
PKCS11_PIN_ENV = "FLEETGATE_PKCS11_PIN"

# Where the issuing CA's private key lives: an encrypted file in <home>/ca, or a PKCS#11 token
# (gateway/keystore_pkcs11.py). The root and audit keys are encrypted files either way.
FILE_KEY_STORE = "file"
PKCS11_KEY_STORE = "pkcs11"
KEY_STORES = (FILE_KEY_STORE, PKCS11_KEY_STORE)

# The bounds EnrollmentPolicy enforces (gateway/enrollment/policy.py), checked here as well so
# a bad value is a ConfigError naming its key when the file is read, not a ValueError from
# deep inside the gateway when it starts (tests/gateway/test_config.py holds them together).
MIN_CERT_LIFETIME = int(MIN_LEAF_LIFETIME.total_seconds())
MAX_CERT_LIFETIME_SECONDS = int(MAX_CERT_LIFETIME.total_seconds())
def _seconds(bounds: tuple[timedelta, timedelta]) -> tuple[int, int]:
    return int(bounds[0].total_seconds()), int(bounds[1].total_seconds())


NONCE_TTL_BOUNDS = _seconds(NONCE_TTL_RANGE)
CLOCK_SKEW_BOUNDS = _seconds(MAX_CLOCK_SKEW_RANGE)
PENDING_RETRY_BOUNDS = (1, MAX_PENDING_RETRY_AFTER)
# A CA outliving a century is a mistake, and certificate dates stop at the year 9999.
MAX_CA_LIFETIME_DAYS = 36500
CRL_VALIDITY_BOUNDS = (1, 24 * 30)
_DATABASE_URL = re.compile(r"(sqlite|postgresql(\+psycopg)?)://.*", re.DOTALL)


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range."""


def _within(key: str, value: float, low: float, high: float, unit: str = "") -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} must lie between {low} and {high}{unit}, got {value}")


def check_database_url(url: str, where: str = "database_url") -> str:
    """A registry URL the gateway can open: sqlite:///PATH or postgresql://USER@HOST/DB."""
    if _DATABASE_URL.fullmatch(url) is None:
        raise ConfigError(
            f"{where} must be sqlite:///PATH or postgresql://USER@HOST/DB, got {url!r}"
        )
    return url


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV, ".fleetgate"))


@dataclass(frozen=True)
class CaSettings:
    key_type: KeyType = KeyType.P256
    root_lifetime_days: int = 3650
    issuing_lifetime_days: int = 180
    # The CRL's nextUpdate: a broker refuses every certificate once it has passed, so the
    # gateway re-signs it well before (every quarter of this or every hour, whichever is sooner).
    crl_validity_hours: int = 24
    key_store: str = FILE_KEY_STORE
    # Read only with key_store = "pkcs11"; the user PIN is $FLEETGATE_PKCS11_PIN, never here.
    pkcs11_module: str = ""
    pkcs11_token_label: str = ""

    def __post_init__(self) -> None:
        _within("ca.root_lifetime_days", self.root_lifetime_days, 1, MAX_CA_LIFETIME_DAYS)
        # an issuing CA cannot outlive its root: a longer lifetime would be cut short silently
        _within(
            "ca.issuing_lifetime_days",
            self.issuing_lifetime_days,
            1,
            self.root_lifetime_days,
            " (ca.root_lifetime_days)",
        )
        _within("ca.crl_validity_hours", self.crl_validity_hours, *CRL_VALIDITY_BOUNDS)
        if self.key_store not in KEY_STORES:
            raise ConfigError(
                f"ca.key_store must be 'file' or 'pkcs11', got {self.key_store!r}"
            )
        if self.uses_token:
            _check_pkcs11_module(self.pkcs11_module)
            if not self.pkcs11_token_label.strip():
                raise ConfigError(
                    "ca.pkcs11_token_label must name the token (its label) when "
                    "ca.key_store = 'pkcs11'"
                )

    @property
    def crl_validity(self) -> timedelta:
        return timedelta(hours=self.crl_validity_hours)

    @property
    def uses_token(self) -> bool:
        """The issuing CA's key is in a PKCS#11 token, not in ca/issuing.key."""
        return self.key_store == PKCS11_KEY_STORE


def _check_pkcs11_module(module: str) -> None:
    # Absolute: a relative path would depend on the directory the gateway was started from.
    if not module.strip():
        raise ConfigError(
            "ca.pkcs11_module must name the token's PKCS#11 library when ca.key_store = 'pkcs11' "
            "(e.g. /usr/lib/softhsm/libsofthsm2.so)"
        )
    path = Path(module)
    if not path.is_absolute():
        raise ConfigError(f"ca.pkcs11_module must be an absolute path, got {module!r}")
    if not path.is_file():
        raise ConfigError(f"ca.pkcs11_module: {module} does not exist or is not a file")


def pkcs11_pin(ca: CaSettings) -> str:
    """The token's user PIN, from $FLEETGATE_PKCS11_PIN only: a PIN in fleetgate.toml would sit
    beside the settings every command reads and every backup copies."""
    value = os.environ.get(PKCS11_PIN_ENV, "")
    if not value:
        raise ConfigError(
            f"no PKCS#11 PIN: set ${PKCS11_PIN_ENV} to the user PIN of token "
            f"{ca.pkcs11_token_label!r} (ca.key_store = 'pkcs11')"
        )
    return value


@dataclass(frozen=True)
class CertificateSettings:
    lifetime_seconds: int = 3600
    renew_fraction: float = 2 / 3
    renew_jitter: float = 0.05

    def __post_init__(self) -> None:
        _within(
            "certificates.lifetime_seconds",
            self.lifetime_seconds,
            MIN_CERT_LIFETIME,
            MAX_CERT_LIFETIME_SECONDS,
            " (1 minute to 30 days)",
        )
        _within("certificates.renew_fraction", self.renew_fraction, 0.1, 0.95)
        _within("certificates.renew_jitter", self.renew_jitter, 0, 0.2)

    @property
    def lifetime(self) -> timedelta:
        return timedelta(seconds=self.lifetime_seconds)


@dataclass(frozen=True)
class BrokerSettings:
    kind: str = "embedded"
    host: str = "127.0.0.1"
    enrollment_port: int = 8883
    operational_port: int = 8884

    def __post_init__(self) -> None:
        if self.kind not in ("embedded", "mosquitto"):
            raise ConfigError(f"broker.kind must be 'embedded' or 'mosquitto', got {self.kind!r}")
        if not self.host.strip():
            raise ConfigError("broker.host must name an address to listen on")
        for name in ("enrollment_port", "operational_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"broker.{name} must be a TCP port (0-65535), got {port}")
        if self.enrollment_port == self.operational_port != 0:
            raise ConfigError(
                "broker.enrollment_port and broker.operational_port must differ, both are "
                f"{self.enrollment_port}"
            )


@dataclass(frozen=True)
class EnrollmentSettings:
    nonce_ttl_seconds: int = 60
    max_clock_skew_seconds: int = 300
    pending_retry_after: int = 10
    require_known_firmware: bool = False

    def __post_init__(self) -> None:
        _within("enrollment.nonce_ttl_seconds", self.nonce_ttl_seconds, *NONCE_TTL_BOUNDS)
        _within(
            "enrollment.max_clock_skew_seconds", self.max_clock_skew_seconds, *CLOCK_SKEW_BOUNDS
        )
        _within(
            "enrollment.pending_retry_after", self.pending_retry_after, *PENDING_RETRY_BOUNDS
        )


@dataclass(frozen=True)
class ApprovalRuleSettings:
    manufacturer: str = "*"
    model: str = "*"

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model"):
            if not getattr(self, name):
                raise ConfigError(f"policy.auto_approve.{name} must not be empty (use '*')")


@dataclass(frozen=True)
class PolicySettings:
    auto_approve: tuple[ApprovalRuleSettings, ...] = ()
    # model -> allowed firmware digests (sha256 hex)
    firmware: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    denied_birth_fingerprints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    home: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    database_url: str = ""
    passphrase_file: str = "secrets/passphrase"
    audit_checkpoint_every: int = 100
    ca: CaSettings = field(default_factory=CaSettings)
    certificates: CertificateSettings = field(default_factory=CertificateSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    enrollment: EnrollmentSettings = field(default_factory=EnrollmentSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    anomaly: AnomalySettings = field(default_factory=AnomalySettings)

    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def manufacturers_dir(self) -> Path:
        """PEM files of the manufacturer roots whose birth certificates we trust."""
        return self.home / "trust" / "manufacturers"

    @property
    def database(self) -> str:
        if url := os.environ.get(DATABASE_ENV):
            return url
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @property
    def passphrase_path(self) -> Path:
        return self.home / self.passphrase_file

    def passphrase(self) -> bytes:
        """The passphrase that unlocks the CA keys: $FLEETGATE_PASSPHRASE or the passphrase file."""
        if value := passphrase_from_environment():
            return value
        path = self.passphrase_path
        try:
            return path.read_bytes().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"no passphrase: set ${PASSPHRASE_ENV} or create {path}"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the passphrase file {path} (passphrase_file): "
                f"{exc.strerror or exc}"
            ) from None


def passphrase_from_environment() -> bytes | None:
    """$FLEETGATE_PASSPHRASE, which overrides the passphrase file everywhere (init included)."""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build a settings dataclass from a TOML table, refusing unknown keys and wrong types."""
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {where}{key}")
        default = getattr(cls(), key) if cls is not Settings else None
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}{key} must be true or false")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where}{key} must be an integer")
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{where}{key} must be a number")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}{key} must be a string")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where.rstrip('.') or 'settings'}: {exc}") from exc


def _policy(data: Mapping[str, Any]) -> PolicySettings:
    unknown = set(data) - {"auto_approve", "firmware", "denied_birth_fingerprints"}
    if unknown:
        raise ConfigError(f"unknown setting policy.{sorted(unknown)[0]}")
    rules = data.get("auto_approve", [])
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
        raise ConfigError("policy.auto_approve must be a list of tables")
    firmware = data.get("firmware", {})
    if not isinstance(firmware, dict) or not all(
        isinstance(v, list) and all(isinstance(d, str) for d in v) for v in firmware.values()
    ):
        raise ConfigError("policy.firmware must map a model to a list of sha256 hex digests")
    for model, digests in firmware.items():
        if not model:
            raise ConfigError("policy.firmware: a model name must not be empty")
        for digest in digests:
            if SHA256_HEX.fullmatch(digest) is None:
                raise ConfigError(
                    f"policy.firmware.{model}: {digest!r} is not a lower-case sha256 hex digest"
                )
    denied = data.get("denied_birth_fingerprints", [])
    if not isinstance(denied, list) or not all(isinstance(d, str) for d in denied):
        raise ConfigError("policy.denied_birth_fingerprints must be a list of strings")
    for fingerprint in denied:
        if SHA256_HEX.fullmatch(fingerprint.lower()) is None:
            raise ConfigError(
                f"policy.denied_birth_fingerprints: {fingerprint!r} is not a sha256 hex digest"
            )
    return PolicySettings(
        auto_approve=tuple(
            _build(ApprovalRuleSettings, r, "policy.auto_approve.") for r in rules
        ),
        firmware={model: tuple(d) for model, d in firmware.items()},
        denied_birth_fingerprints=tuple(d.lower() for d in denied),
    )


def parse_settings(home: Path, data: Mapping[str, Any]) -> Settings:
    sections = {
        "ca": CaSettings,
        "certificates": CertificateSettings,
        "broker": BrokerSettings,
        "enrollment": EnrollmentSettings,
    }
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            top[key] = _build(sections[key], value, f"{key}.")
        elif key == "anomaly":
            if not isinstance(value, dict):
                raise ConfigError("[anomaly] must be a table")
            try:
                top[key] = AnomalySettings.from_table(value)
            except AnomalySettingsError as exc:
                raise ConfigError(str(exc)) from None
        elif key == "policy":
            if not isinstance(value, dict):
                raise ConfigError("[policy] must be a table")
            top[key] = _policy(value)
        elif key in ("trust_domain", "database_url", "passphrase_file"):
            if not isinstance(value, str):
                raise ConfigError(f"{key} must be a string")
            if key == "database_url" and value:
                check_database_url(value)
            if key == "passphrase_file" and not value.strip():
                raise ConfigError("passphrase_file must name a file (or leave it out)")
            top[key] = value
        elif key == "audit_checkpoint_every":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError("audit_checkpoint_every must be a positive integer")
            top[key] = value
        else:
            raise ConfigError(f"unknown setting {key}")
    if "ca" in top:
        try:
            top["ca"] = replace(top["ca"], key_type=KeyType(top["ca"].key_type))
        except ValueError:
            raise ConfigError(
                f"ca.key_type must be one of {', '.join(k.value for k in KeyType)}"
            ) from None
    settings = Settings(home=home, **top)
    _check_trust_domain(settings.trust_domain)
    return settings


def _check_trust_domain(name: str) -> None:
    # the rule the certificates themselves follow (SPIFFE: lower-case DNS labels)
    try:
        check_trust_domain(name)
    except ValueError:
        raise ConfigError(f"trust_domain {name!r} must be a lower-case DNS-style name") from None


def load_settings(home: Path) -> Settings:
    path = home / CONFIG_NAME
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `fleetgate init --home {home}` first") from None
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_settings(home, data)


def render_default_config(
    trust_domain: str,
    key_type: KeyType,
    passphrase_file: str | None = None,
    ca: CaSettings | None = None,
) -> str:
    """The commented `fleetgate.toml` that `fleetgate init` writes; ``ca`` says where the
    issuing key went (its key_store and token), the lifetimes are the defaults."""
    passphrase_line = (
        f"passphrase_file = {json.dumps(passphrase_file)}"
        if passphrase_file is not None
        else 'passphrase_file = "secrets/passphrase"'
    )
    if ca is not None and ca.uses_token:
        key_store_lines = (
            'key_store = "pkcs11"           # the issuing key is in a PKCS#11 token\n'
            f"pkcs11_module = {json.dumps(ca.pkcs11_module)}\n"
            f"pkcs11_token_label = {json.dumps(ca.pkcs11_token_label)}"
            f"   # user PIN: ${PKCS11_PIN_ENV}\n"
        )
    else:
        key_store_lines = (
            'key_store = "file"             # file (ca/issuing.key, encrypted) | pkcs11 (a token)\n'
        )
    return f"""\
# Fleetgate gateway settings. Every key has a default; see docs/configuration.md.
trust_domain = "{trust_domain}"
# database_url = "postgresql://user@host/fleetgate"   # default: SQLite registry.db in this folder
{passphrase_line:<53} # or set $FLEETGATE_PASSPHRASE
audit_checkpoint_every = 100                          # sign the audit chain head every N events

[ca]
key_type = "{key_type.value}"                          # p256 | p384 | ed25519
root_lifetime_days = 3650
issuing_lifetime_days = 180
crl_validity_hours = 24        # the CRL's nextUpdate; re-signed every quarter of it
{key_store_lines}
[certificates]
lifetime_seconds = 3600        # operational certificates: 60 s to 30 days
renew_fraction = 0.6667        # devices renew at about 2/3 of the lifetime
renew_jitter = 0.05            # +- 5% of the lifetime, so a fleet does not renew in one burst

[broker]
kind = "embedded"              # embedded (amqtt, in-process) | mosquitto
host = "127.0.0.1"
enrollment_port = 8883         # server-authenticated TLS; devices enroll here
operational_port = 8884        # mutual TLS with the certificates we issue

[enrollment]
nonce_ttl_seconds = 60         # how long a challenge stays valid: 5 s to 1 h
max_clock_skew_seconds = 300   # device clock error tolerated: 0 to 1 day
pending_retry_after = 10       # seconds a pending device waits before asking again: 1 to 3600
require_known_firmware = false # true: a model without a firmware allow-list is refused

[anomaly]
enabled = true                 # behaviour baselines and automatic responses (docs/anomaly.md);
                               # without [[anomaly.rules]] the documented default rules apply

[policy]
denied_birth_fingerprints = []  # sha256 hex of birth certificates that may never enroll

# Devices matching a rule are approved at once; the others wait for `fleetgate device approve`.
[[policy.auto_approve]]
manufacturer = "*"
model = "*"

# Allowed firmware digests per model (sha256 hex). A model listed here accepts only these.
[policy.firmware]
"""


def valid_identity_name(name: str) -> bool:
    return re.fullmatch(IDENTITY_NAME_PATTERN, name) is not None
