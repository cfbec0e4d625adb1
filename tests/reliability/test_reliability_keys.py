"""The CA's private keys: encrypted at rest, owner-only, and never in a log line or an error
message, even with debug logging on and errors provoked on purpose."""

from __future__ import annotations

import asyncio
import base64
import shutil
import stat
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from reliability_support import FieldDevice, GatewayProcess, fleetgate, make_home

from gateway.home import AUDIT_KEY, ISSUING_KEY, ROOT_KEY
from gateway.keystore import EncryptedFileKeyStore
from gateway.protocol import topics
from simulators.factory import MODEL
from simulators.tls import server_auth_context

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HOSTILE_PAYLOADS = [
    b"not json at all",
    b'{"v":1,"type":"hello","id":"x1","chain":["!!!"]}',
    b'{"v":1,"type":"enroll","id":"x2","csr":"MAA="}',
    b"[" * 5000,
    b'{"v":1,"type":"renew","id":"x3"}',
]


def secrets_of(home: Path) -> dict[str, bytes]:
    """Everything that must never be printed: the passphrase and each CA key's private scalar
    in every usual spelling, the PEM of the keys, and the encrypted key files' bodies."""
    passphrase = (home / "secrets" / "passphrase").read_bytes().strip()
    found = {"passphrase": passphrase}
    keys = EncryptedFileKeyStore(home / "ca", passphrase)
    for name in (ROOT_KEY, ISSUING_KEY, AUDIT_KEY):
        private = keys.load(name).private_key
        if isinstance(private, ec.EllipticCurvePrivateKey):
            value = private.private_numbers().private_value
            raw = value.to_bytes((private.curve.key_size + 7) // 8, "big")
        else:
            assert isinstance(private, ed25519.Ed25519PrivateKey)
            raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            value = int.from_bytes(raw, "big")
        pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        pem_body = b"".join(pem.splitlines()[1:-1])
        found |= {
            f"{name} hex": raw.hex().encode(),
            f"{name} HEX": raw.hex().upper().encode(),
            f"{name} base64": base64.b64encode(raw).rstrip(b"="),
            f"{name} base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
            f"{name} decimal": str(value).encode(),
            f"{name} pem": pem_body[:48],
            f"{name} file": b"".join((home / "ca" / f"{name}.key").read_bytes().splitlines()[1:2]),
        }
    return found


def assert_nothing_leaked(text: bytes, secrets: dict[str, bytes]) -> None:
    assert b"PRIVATE KEY" not in text, "a PEM private key marker was printed"
    for label, secret in secrets.items():
        assert secret and secret not in text, f"the {label} was printed"


async def send_garbage(settings: object, ca_pem: bytes) -> list[bytes]:
    answers: list[bytes] = []
    broker = settings.broker  # type: ignore[attr-defined]
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.enrollment_port,
        identifier="leaky-1",
        tls_context=server_auth_context(ca_pem),
        timeout=5,
    ) as mqtt:
        await mqtt.subscribe(topics.enroll_response("leaky-1"), qos=1)
        messages = mqtt.messages.__aiter__()
        for payload in HOSTILE_PAYLOADS:
            await mqtt.publish(topics.enroll_request("leaky-1"), payload, qos=1)
            message = await asyncio.wait_for(messages.__anext__(), 10)
            answers.append(bytes(message.payload))
    return answers


async def test_no_key_material_in_debug_logs_or_error_output(tmp_path: Path) -> None:
    settings, factory = make_home(tmp_path / "gw")
    home = settings.home
    secrets = secrets_of(home)
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    outputs: list[bytes] = []

    # A wrong passphrase: the gateway refuses to start and says why, without the key.
    wrong = GatewayProcess(settings, verbose=True)
    wrong.start(env={"FLEETGATE_PASSPHRASE": "not-" + secrets["passphrase"].decode()})
    assert wrong.process is not None and wrong.process.wait(timeout=30) != 0
    refused = wrong.logs[-1].read_bytes()
    assert b"wrong_passphrase" in refused or b"wrong passphrase" in refused
    outputs.append(refused)

    # A damaged key file (in a copy of the home): the error names the file, not its content.
    damaged_home = tmp_path / "damaged"
    shutil.copytree(home, damaged_home)
    key_file = damaged_home / "ca" / "issuing.key"
    first, body, *rest = key_file.read_bytes().splitlines()
    key_file.write_bytes(b"\n".join([first, body[:20] + b"AAAA" + body[24:], *rest]))
    damaged = fleetgate("run", "--home", str(damaged_home), "--verbose", timeout=60)
    assert damaged.returncode != 0
    outputs.append((damaged.stdout + damaged.stderr).encode())

    # The real gateway, debug logging on: a device enrolls, hostile requests are refused.
    gateway = GatewayProcess(settings, verbose=True)
    gateway.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, gateway.wait_ready)
    try:
        device = FieldDevice(factory.mint("leak-0001", MODEL), ca_pem, settings, renewals=1)
        await device.go(loop.time() + 30)
        answers = await send_garbage(settings, ca_pem)
        assert all(b'"type":"error"' in answer for answer in answers)
    finally:
        assert gateway.stop() == 0, gateway.output()
    outputs.extend(path.read_bytes() for path in gateway.logs)
    assert b"DEBUG" in outputs[-1], "debug logging was not on"
    for command in (("device", "list"), ("audit", "verify"), ("audit", "tail")):
        done = fleetgate(*command, "--home", str(home))
        outputs.append((done.stdout + done.stderr).encode())

    for text in outputs:
        assert_nothing_leaked(text, secrets)


def test_ca_keys_are_encrypted_and_owner_only_at_rest(tmp_path: Path) -> None:
    settings, _ = make_home(tmp_path / "gw")
    ca_dir = settings.ca_dir
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    for name in (ROOT_KEY, ISSUING_KEY, AUDIT_KEY):
        path = ca_dir / f"{name}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    passphrase = settings.home / "secrets" / "passphrase"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    # Only public material is readable by others.
    for public in ("root.crt", "issuing.crt", "audit.pub"):
        assert b"PRIVATE" not in (ca_dir / public).read_bytes()
