"""`fleetgate init`: create the gateway's CA, keys and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.common import HomeOption, console, fail, resolve_home
from gateway.config import ConfigError, _check_trust_domain
from gateway.home import HomeExistsError, init_home
from pki.keys import KeyType


def init_command(
    home: HomeOption = None,
    trust_domain: Annotated[
        str, typer.Option(help="SPIFFE trust domain of the identities this gateway issues.")
    ] = "fleetgate.local",
    key_type: Annotated[KeyType, typer.Option(help="Key type of the CA keys.")] = KeyType.P256,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(help="File holding the passphrase that encrypts the CA keys."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (old certificates break).")
    ] = False,
) -> None:
    """Create the root and issuing CA, encrypted keys and fleetgate.toml."""
    folder = resolve_home(home)
    try:
        _check_trust_domain(trust_domain)
    except ConfigError as exc:
        fail(str(exc))
    passphrase = None
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_bytes().strip()
        except OSError as exc:
            fail(f"cannot read passphrase file: {exc.strerror}")
        if not passphrase:
            fail(f"{passphrase_file} is empty")
    try:
        result = init_home(
            folder, trust_domain=trust_domain, key_type=key_type, passphrase=passphrase, force=force
        )
    except HomeExistsError as exc:
        fail(str(exc))
    console.print(f"[bold green]Initialised[/] gateway home [bold]{result.home}[/]")
    subject = result.root.subject.rfc4514_string()
    console.print(f"  root CA      {result.root_certificate}  ({subject})")
    console.print(f"  issuing CA   {result.issuing_certificate}")
    console.print(f"  keys         {result.home / 'ca'}/*.key (encrypted, mode 0600)")
    console.print(f"  settings     {result.config}")
    if result.passphrase_file is not None:
        console.print(
            f"  passphrase   generated into {result.passphrase_file} (mode 0600): "
            "keep it safe, or pass --passphrase-file next time"
        )
