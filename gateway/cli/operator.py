"""`fleetgate operator add|list`: people as identities, with a role and a short-lived certificate.

`add` issues an operator certificate from the gateway's issuing CA (so it needs the CA
passphrase, like every CA operation), records the identity, its certificate and the audit event
in one transaction, and writes the console profile the operator opens the console with. Running
it again for an existing operator issues a fresh certificate (the old one is superseded) and
sets the role given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gateway.admin.profile import Profile
from gateway.admin.roles import Role
from gateway.admin.views import current_certificate
from gateway.cli.common import (
    HomeOption,
    JsonOption,
    console,
    err_console,
    fail,
    print_json,
    settings_for,
)
from gateway.config import ConfigError, Settings
from gateway.home import load_keys, pem, write_private
from gateway.operations import cli_actor, open_store
from gateway.store import (
    AuditEntry,
    CertificateRecord,
    CertificateStatus,
    DuplicateError,
    IdentityRecord,
    IdentityState,
    Store,
    StoredResponse,
    StoreError,
)
from pki.clock import Clock, SystemClock
from pki.csr import public_key_fingerprint
from pki.errors import PkiError
from pki.issue import Issuer
from pki.keys import LocalSigner, encrypt_private_key
from pki.profile import IdentityKind, LeafTemplate, is_identity_name

app = typer.Typer(help="Operators: people who use the console.", no_args_is_help=True)

MIN_LIFETIME_HOURS = 0.05  # three minutes: enough for a test, never a default
MAX_LIFETIME_HOURS = 24.0 * 7
MIN_PROFILE_PASSPHRASE = 8


class OperatorAddError(ValueError):
    """``add_operator`` cannot proceed; the message says why (the CLI prints it)."""


@dataclass(frozen=True)
class AddedOperator:
    record: IdentityRecord
    certificate: CertificateRecord
    profile: Profile
    reissued: bool


def add_operator(
    settings: Settings,
    store: Store,
    name: str,
    role: Role,
    profile_passphrase: bytes,
    *,
    lifetime: timedelta,
    host: str | None = None,
    port: int | None = None,
    actor: str,
    clock: Clock | None = None,
) -> AddedOperator:
    """Issue an operator certificate, record it, and build the console profile (not written).
    Raises OperatorAddError; the CA passphrase problems come as ConfigError and PkiError."""
    if not is_identity_name(name):
        raise OperatorAddError(f"{name!r} is not a valid operator name")
    existing = store.get_identity(name)
    if existing is not None and existing.kind is not IdentityKind.OPERATOR:
        raise OperatorAddError(f"{name} is already a {existing.kind.value}; choose another name")
    if existing is not None and existing.state is IdentityState.REVOKED:
        raise OperatorAddError(f"operator {name} is revoked for good; choose another name")
    operational_port = port if port is not None else settings.broker.operational_port
    if not 1 <= operational_port <= 65535:
        raise OperatorAddError(
            "the gateway's operational port is not fixed in fleetgate.toml; give --port"
        )
    clock = clock or SystemClock()
    keys = load_keys(settings)
    key = LocalSigner.generate(keys.issuing.signer.key_type)
    try:
        certificate = Issuer(keys.issuing, clock).issue(
            LeafTemplate(
                kind=IdentityKind.OPERATOR,
                name=name,
                trust_domain=settings.trust_domain,
                lifetime=lifetime,
            ),
            key.public_key(),
        )
    finally:
        keys.close()  # a token session ends here, not at exit
    now = clock.now()
    identity = (
        dataclasses.replace(existing, role=role.value, updated_at=now)
        if existing is not None
        else IdentityRecord(
            id=name,
            kind=IdentityKind.OPERATOR,
            state=IdentityState.ACTIVE,
            created_at=now,
            updated_at=now,
            role=role.value,
        )
    )
    row = CertificateRecord(
        serial=certificate.serial_number,
        identity_id=name,
        public_key_fingerprint=public_key_fingerprint(certificate.public_key()),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        issued_at=now,
        pem=pem(certificate).decode("ascii"),
        status=CertificateStatus.ACTIVE,
        request_id=f"operator-add-{certificate.serial_number:x}",
    )
    command = f"operator add {name} --role {role.value} --lifetime {lifetime.total_seconds()}"
    store.record_outcome(
        response=StoredResponse(
            identity_id=name,
            request_id=row.request_id or "",
            kind="operator_add",
            outcome="issued",
            payload=b"",
            at=now,
            request_digest=hashlib.sha256(command.encode("utf-8")).hexdigest(),
        ),
        identity=identity,
        certificate=row,
        audit=[
            AuditEntry(
                actor=actor,
                action="operator_add",
                subject=name,
                outcome="ok",
                at=now,
                detail={
                    "role": role.value,
                    "serial": f"{row.serial:x}",
                    "not_after": row.not_after.isoformat(),
                    "reissued": "yes" if existing is not None else "no",
                },
            )
        ],
    )
    ca_chain = pem(keys.issuing.certificate) + pem(keys.root_certificate)
    profile = Profile(
        name=name,
        host=host or settings.broker.host,
        port=operational_port,
        ca_pem=ca_chain,
        certificate_pem=pem(certificate) + pem(keys.issuing.certificate),
        encrypted_key_pem=encrypt_private_key(key, profile_passphrase),
    )
    return AddedOperator(identity, row, profile, reissued=existing is not None)


def _read_passphrase(path: Path) -> bytes:
    try:
        value = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        fail(f"cannot read the passphrase file {path}: {exc.strerror or exc}")
    if len(value) < MIN_PROFILE_PASSPHRASE:
        fail(f"the profile passphrase must be at least {MIN_PROFILE_PASSPHRASE} bytes")
    return value


@app.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="The operator's name (its identity and client id).")],
    role: Annotated[Role, typer.Option(help="What the operator may do.")],
    home: HomeOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the console profile (default ./NAME.profile.json)."),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            help="File holding the passphrase that encrypts the profile's key "
            "(default: a generated one, printed once).",
        ),
    ] = None,
    lifetime_hours: Annotated[
        float,
        typer.Option(
            "--lifetime-hours",
            min=MIN_LIFETIME_HOURS,
            max=MAX_LIFETIME_HOURS,
            help="How long the operator certificate lasts.",
        ),
    ] = 12.0,
    host: Annotated[
        str | None,
        typer.Option(help="Gateway host the console connects to (default: broker.host)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Operational port (default: broker.operational_port)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing profile file.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Issue an operator certificate and write the console profile."""
    settings = settings_for(home)
    target = out if out is not None else Path(f"{name}.profile.json")
    if target.exists() and not force:
        fail(f"{target} exists (use --force to overwrite it)")
    generated = passphrase_file is None
    if passphrase_file is None:
        passphrase = secrets.token_urlsafe(24).encode()
    else:
        passphrase = _read_passphrase(passphrase_file)
    store = open_store(settings)
    try:
        added = add_operator(
            settings,
            store,
            name,
            role,
            passphrase,
            lifetime=timedelta(hours=lifetime_hours),
            host=host,
            port=port,
            actor=cli_actor(),
        )
    except (OperatorAddError, ConfigError) as exc:
        fail(str(exc))
    except PkiError as exc:
        fail(f"the CA refused: {exc.reason}: {exc.detail}")
    except (DuplicateError, StoreError) as exc:
        fail(f"the registry refused: {exc}")
    try:
        write_private(target, added.profile.to_json())
    except OSError as exc:
        fail(
            f"the certificate is recorded but the profile could not be written to {target}: "
            f"{exc.strerror or exc}; run the command again with another --out"
        )
    if as_json:
        data: dict[str, object] = {
            "name": name,
            "role": role.value,
            "serial": f"{added.certificate.serial:x}",
            "not_after": added.certificate.not_after.isoformat(),
            "profile": str(target),
            "reissued": added.reissued,
        }
        if generated:
            data["passphrase"] = passphrase.decode()
        print_json(data)
        return
    verb = "re-issued" if added.reissued else "added"
    console.print(
        f"[green]{verb}[/] operator [bold]{name}[/] ({role.value}), certificate valid until "
        f"{added.certificate.not_after.isoformat(timespec='seconds')}"
    )
    console.print(f"console profile written to {target} (mode 0600)")
    if generated:
        err_console.print(
            "[bold yellow]warning:[/] the profile's key is encrypted with this passphrase. It is "
            "shown once and stored nowhere: hand it to the operator apart from the profile."
        )
        console.print(passphrase.decode(), highlight=False, soft_wrap=True)


@app.command("list")
def list_command(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """List operators with their role, state and certificate expiry."""
    store = open_store(settings_for(home))
    rows = []
    for record in sorted(store.list_identities(kind=IdentityKind.OPERATOR), key=lambda r: r.id):
        newest = current_certificate(store.certificates_for(record.id))
        rows.append(
            {
                "name": record.id,
                "role": record.role,
                "state": record.state.value,
                "certificate_not_after": newest.not_after.isoformat() if newest else None,
                "last_seen_at": record.last_seen_at.isoformat() if record.last_seen_at else None,
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} operators")
    for column in ("name", "role", "state", "certificate until", "last seen"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[k] or "-") for k in row))
    console.print(table)
