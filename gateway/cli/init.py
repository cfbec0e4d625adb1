"""`fleetgate init`: create the gateway's CA, keys and settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import HomeOption, console, fail, resolve_home
from gateway.config import (
    DEFAULT_TRUST_DOMAIN,
    FILE_KEY_STORE,
    PASSPHRASE_ENV,
    PKCS11_KEY_STORE,
    PKCS11_PIN_ENV,
    ConfigError,
    _check_trust_domain,
    passphrase_from_environment,
)
from gateway.home import HomeExistsError, init_home
from pki.errors import KeyStoreError
from pki.keys import KeyType


class KeyStoreChoice(StrEnum):
    """Where the issuing CA's key is made (ca.key_store)."""

    FILE = FILE_KEY_STORE
    PKCS11 = PKCS11_KEY_STORE


@contextmanager
def init_errors_reported(home: Path) -> Iterator[None]:
    """Around ``init_home``: what stops it (an earlier CA, a bad setting in a fleetgate.toml
    written beforehand, a token that will not open, an unwritable home) becomes a one-line
    error, never a traceback. Shared by `init` and by `demo`, which initialises a new home."""
    try:
        yield
    except (HomeExistsError, ConfigError) as exc:
        fail(str(exc))
    except KeyStoreError as exc:
        fail(f"cannot make the CA keys: {exc}")
    except OSError as exc:
        fail(f"cannot write the gateway home {home}: {exc.strerror or exc}")


def init_command(
    home: HomeOption = None,
    trust_domain: Annotated[
        str | None,
        typer.Option(
            help="SPIFFE trust domain of the identities this gateway issues. Default: what an "
            f"existing fleetgate.toml says, else {DEFAULT_TRUST_DOMAIN}.",
            show_default=False,
        ),
    ] = None,
    key_type: Annotated[
        KeyType | None,
        typer.Option(
            help="Key type of the CA keys. Default: ca.key_type in an existing fleetgate.toml, "
            f"else {KeyType.P256.value}.",
            show_default=False,
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the passphrase that encrypts the CA keys (recorded in a new "
            f"fleetgate.toml). Default: ${PASSPHRASE_ENV} if set, else one is generated."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing CA, and the token's issuing key (old certificates break).",
        ),
    ] = False,
    key_store: Annotated[
        KeyStoreChoice | None,
        typer.Option(
            help="Where the issuing CA's key is made: an encrypted file in ca/, or a PKCS#11 "
            f"token (user PIN from ${PKCS11_PIN_ENV}). Default: what an existing fleetgate.toml "
            "says, else file.",
            show_default=False,
        ),
    ] = None,
    pkcs11_module: Annotated[
        Path | None,
        typer.Option(
            help="The token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so "
            "(with --key-store pkcs11).",
            show_default=False,
        ),
    ] = None,
    pkcs11_token: Annotated[
        str | None,
        typer.Option(
            help="The label of the token to make the issuing key in (with --key-store pkcs11).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create the root and issuing CA, encrypted keys and fleetgate.toml."""
    folder = resolve_home(home)
    if trust_domain is not None:
        try:
            _check_trust_domain(trust_domain)
        except ConfigError as exc:
            fail(str(exc))
    if key_store is KeyStoreChoice.PKCS11 and (pkcs11_module is None or pkcs11_token is None):
        fail("--key-store pkcs11 needs --pkcs11-module and --pkcs11-token")
    if key_store is not KeyStoreChoice.PKCS11 and (
        pkcs11_module is not None or pkcs11_token is not None
    ):
        fail("--pkcs11-module and --pkcs11-token go with --key-store pkcs11")
    passphrase = from_environment = passphrase_from_environment()
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_bytes().strip()
        except OSError as exc:
            fail(f"cannot read passphrase file: {exc.strerror}")
        if not passphrase:
            fail(f"{passphrase_file} is empty")
        # Every later command prefers the variable: keys encrypted with the file would not open.
        if from_environment is not None and from_environment != passphrase:
            fail(
                f"${PASSPHRASE_ENV} is set and differs from {passphrase_file}: the gateway "
                "would read the variable and fail to open these keys; unset it or make them equal"
            )
    with init_errors_reported(folder):
        result = init_home(
            folder,
            trust_domain=trust_domain,
            key_type=key_type,
            passphrase=passphrase,
            passphrase_file=passphrase_file,
            force=force,
            key_store=key_store.value if key_store is not None else None,
            # absolute: fleetgate.toml must name it whatever directory the gateway starts in
            pkcs11_module=str(pkcs11_module.absolute()) if pkcs11_module is not None else None,
            pkcs11_token_label=pkcs11_token,
        )
    console.print(f"[bold green]Initialised[/] gateway home [bold]{result.home}[/]")
    subject = result.root.subject.rfc4514_string()
    console.print(f"  root CA      {result.root_certificate}  ({subject})")
    console.print(f"  issuing CA   {result.issuing_certificate}")
    if result.token_label is not None:
        console.print(
            f"  issuing key  in PKCS#11 token {result.token_label!r} (sensitive, not extractable)"
        )
        console.print(
            f"  keys         {result.home / 'ca'}/root.key, audit.key (encrypted, mode 0600); "
            "root.key is needed only to make a new issuing CA: move it off the box"
        )
        console.print(f"  PIN          ${PKCS11_PIN_ENV}: set it whenever the gateway runs")
    else:
        console.print(f"  keys         {result.home / 'ca'}/*.key (encrypted, mode 0600)")
    kept = "" if result.config_written else " (kept as it was)"
    console.print(f"  settings     {result.config}{kept}")
    if result.passphrase_file is not None:
        console.print(
            f"  passphrase   generated into {result.passphrase_file} (mode 0600): keep it safe"
        )
    elif passphrase_file is not None:
        # a kept fleetgate.toml is not changed: a note below says when it names another file
        recorded = f" (recorded in {result.config})" if result.config_written else ""
        console.print(f"  passphrase   read from {passphrase_file}{recorded}")
    else:
        console.print(f"  passphrase   ${PASSPHRASE_ENV}: set it whenever the gateway runs")
    for note in result.notes:
        console.print(f"[bold yellow]note:[/] {note}")
