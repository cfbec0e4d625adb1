"""`fleetgate audit verify` on a real home: an audit trail written by real enrollments into the
SQLite registry, signed with the home's audit key, then tampered with through SQLite itself.

tests/gateway/test_audit.py proves ``verify_chain`` on records; this proves the command an
auditor runs: it reads the registry and the public key from the home, exits 1 and names the
first bad record for each kind of tampering, and exits 0 on an untouched trail. With a
checkpoint exported by `fleetgate audit checkpoint` and kept off the box, it also catches the
checkpoints deleted together with the tail.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from gateway.audit import AuditWriter, checkpoint_message, record_hash
from gateway.cli import app
from gateway.config import CONFIG_NAME, load_settings
from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.home import AUDIT_KEY, load_keys
from gateway.protocol import Error, IssuedCertificate
from gateway.registry import SqlStore
from pki.keys import LocalSigner

runner = CliRunner()
RECORDS = 16  # 8 devices: an enrollment and a refused replay of its nonce each
CHECKPOINT = 10


def verify(home: Path, *options: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["audit", "verify", "--home", str(home), "--json", *options])
    return result.exit_code, json.loads(result.stdout)


def export_checkpoint(home: Path, output: Path) -> dict[str, object]:
    result = runner.invoke(
        app, ["audit", "checkpoint", "--home", str(home), "--output", str(output), "--json"]
    )
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def one_line(text: str) -> str:
    """Output as one line: the console wraps long messages at its width."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose registry holds RECORDS audit records from real enrollments, checkpointed
    at CHECKPOINT by the home's audit key (made once; each test works on a copy)."""
    home = tmp_path_factory.mktemp("audit") / "gw"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
    # The interval the trail below is signed at, as a gateway running this home would sign it.
    config = home / CONFIG_NAME
    data = tomllib.loads(config.read_text())
    data["audit_checkpoint_every"] = CHECKPOINT
    config.write_text(tomli_w.dumps(data))
    settings = load_settings(home)
    audit_key = load_keys(settings).keystore.load(AUDIT_KEY)
    with SqlStore(settings.database) as store:
        gw = LoopbackGateway(store=store)
        writer = AuditWriter(store, audit_key, gw.clock, every=CHECKPOINT)
        for n in range(8):
            credential = gw.mint(f"dev-{n}")
            challenge = gw.challenge(credential, f"h-{n}")
            request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
            assert isinstance(gw.ask(credential.serial_number, request), IssuedCertificate)
            stale, _ = build_enroll(
                credential, challenge.nonce, time=gw.now(), request_id=f"again-{n}"
            )
            assert isinstance(gw.ask(credential.serial_number, stale), Error)
            writer.maybe_checkpoint()
        assert [c.seq for c in store.checkpoints()] == [CHECKPOINT]
        assert len(store.audit_records()) == RECORDS
    return home


@pytest.fixture
def home(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "gw"
    shutil.copytree(pristine, copy)
    return copy


def sql(home: Path, *statements: str, parameters: tuple[object, ...] = ()) -> None:
    with sqlite3.connect(home / "registry.db") as connection:
        for statement in statements:
            connection.execute(statement, parameters if "?" in statement else ())


def _edit_detail(home: Path) -> None:
    sql(home, """UPDATE audit_event SET detail = '{"serial": "1"}' WHERE seq = 5""")


def _edit_outcome(home: Path) -> None:
    sql(home, "UPDATE audit_event SET outcome = 'ok' WHERE seq = 6")


def _edit_actor(home: Path) -> None:
    sql(home, "UPDATE audit_event SET actor = 'operator:mallory' WHERE seq = 5")


def _edit_reasons(home: Path) -> None:
    sql(home, """UPDATE audit_event SET reasons = '[]' WHERE seq = 6""")


def _delete_one(home: Path) -> None:
    sql(home, "DELETE FROM audit_event WHERE seq = 8")


def _delete_first(home: Path) -> None:
    sql(home, "DELETE FROM audit_event WHERE seq = 1")


def _insert(home: Path) -> None:
    # A forged record slipped in as number 10, everything after it renumbered to make room.
    sql(
        home,
        "UPDATE audit_event SET seq = seq + 1000 WHERE seq >= 10",
        "UPDATE audit_event SET seq = seq - 999 WHERE seq >= 1010",
        "INSERT INTO audit_event (seq, prev_hash, hash, actor, action, subject, outcome, at,"
        " reasons, detail) SELECT 10, hash, hash, 'operator:mallory', 'approve', 'dev-9', 'ok',"
        " at, '[]', '{}' FROM audit_event WHERE seq = 9",
    )


def _reorder(home: Path) -> None:
    sql(
        home,
        "UPDATE audit_event SET seq = -1 WHERE seq = 11",
        "UPDATE audit_event SET seq = 11 WHERE seq = 12",
        "UPDATE audit_event SET seq = 12 WHERE seq = -1",
    )


def _truncate_behind_checkpoint(home: Path) -> None:
    sql(home, "DELETE FROM audit_event WHERE seq > 7")


def _rewrite_hash(home: Path) -> None:
    sql(home, "UPDATE audit_event SET hash = ? WHERE seq = 3", parameters=("0" * 64,))


def _forge_checkpoint(home: Path) -> None:
    signature = bytes.fromhex("3006020101020101")  # a well-formed ECDSA signature, not ours
    sql(home, "UPDATE audit_checkpoint SET signature = ?", parameters=(signature,))


Attack = Callable[[Path], None]


TAMPERING: list[tuple[Attack, int, str]] = [
    (_edit_detail, 5, "record 5 was edited"),
    (_edit_outcome, 6, "record 6 was edited"),
    (_edit_actor, 5, "record 5 was edited"),
    (_edit_reasons, 6, "record 6 was edited"),
    (_rewrite_hash, 3, "record 3 was edited"),
    (_delete_one, 8, "record 8 is missing"),
    (_delete_first, 1, "record 1 is missing"),
    (_insert, 10, "record 10 was inserted"),
    (_reorder, 11, "records 11 and 12 are out of order"),
    (
        _truncate_behind_checkpoint,
        8,
        f"checkpoint at {CHECKPOINT} names a record that is gone (tail truncated)",
    ),
    (
        _forge_checkpoint,
        CHECKPOINT,
        f"checkpoint signature invalid (checkpoint at {CHECKPOINT})",
    ),
]


@pytest.mark.parametrize(
    ("attack", "first_bad", "problem"),
    # named by the attack alone, as docs/security.md names them
    [pytest.param(*case, id=case[0].__name__) for case in TAMPERING],
)
def test_audit_verify_catches_tampering(
    home: Path, attack: Attack, first_bad: int, problem: str
) -> None:
    attack(home)
    code, verdict = verify(home)
    assert code == 1
    assert verdict["ok"] is False
    assert (verdict["first_bad_seq"], verdict["problem"]) == (first_bad, problem)


def test_audit_verify_passes_an_untouched_trail(home: Path) -> None:
    code, verdict = verify(home)
    assert code == 0
    assert verdict == {
        "ok": True,
        "checked": RECORDS,
        "first_bad_seq": None,
        "problem": "",
        "last_checkpoint_seq": CHECKPOINT,
        "warning": "",
    }


def test_the_unsigned_tail_is_the_documented_limit(home: Path) -> None:
    """Records after the newest checkpoint can be cut off unnoticed: nothing signed vouches for
    them yet. The gateway signs every few seconds and at shutdown to keep that tail short."""
    sql(home, f"DELETE FROM audit_event WHERE seq > {CHECKPOINT}")
    code, verdict = verify(home)
    assert code == 0 and verdict["checked"] == CHECKPOINT


def test_the_human_output_names_the_problem(home: Path) -> None:
    _delete_one(home)
    result = runner.invoke(app, ["audit", "verify", "--home", str(home)])
    assert result.exit_code == 1
    assert "record 8 is missing" in result.output


# -- checkpoints deleted with the tail, and the exported checkpoint that catches it ---------------


def _delete_checkpoints_and_cut_the_tail(home: Path) -> None:
    sql(home, "DELETE FROM audit_checkpoint", "DELETE FROM audit_event WHERE seq > 3")


def test_deleting_the_checkpoints_with_the_tail_passes_without_an_exported_checkpoint(
    home: Path,
) -> None:
    """The documented limit: with the checkpoints gone, a trail cut to no more than one interval
    (audit_checkpoint_every) looks like a young trail nobody signed yet."""
    _delete_checkpoints_and_cut_the_tail(home)
    code, verdict = verify(home)
    assert code == 0 and verdict["checked"] == 3 and verdict["last_checkpoint_seq"] is None


def test_the_exported_checkpoint_catches_the_checkpoints_deleted_with_the_tail(
    home: Path, tmp_path: Path
) -> None:
    exported = export_checkpoint(home, tmp_path / "checkpoint.json")
    assert exported["seq"] == CHECKPOINT
    _delete_checkpoints_and_cut_the_tail(home)
    code, verdict = verify(home, "--checkpoint", str(tmp_path / "checkpoint.json"))
    assert code == 1
    assert (verdict["first_bad_seq"], verdict["problem"]) == (
        4,
        f"exported checkpoint at {CHECKPOINT} names a record that is gone (tail truncated)",
    )


def test_the_exported_checkpoint_catches_a_chain_rewritten_consistently(
    home: Path, tmp_path: Path
) -> None:
    """Record 5 edited and every hash after it recomputed, the tail beyond the checkpoint cut and
    the registry's checkpoints deleted: every link holds, only the signed head differs."""
    export_checkpoint(home, tmp_path / "checkpoint.json")
    with SqlStore(load_settings(home).database) as store:
        records = store.audit_records()
    prev_hash = records[3].hash
    rewritten = []
    for record in records[4:CHECKPOINT]:
        entry = record.entry
        if record.seq == 5:
            entry = dataclasses.replace(entry, actor="operator:mallory")
        digest = record_hash(prev_hash, record.seq, entry)
        rewritten.append((entry, prev_hash, digest, record.seq))
        prev_hash = digest
    with sqlite3.connect(home / "registry.db") as connection:
        for entry, prev, digest, seq in rewritten:
            connection.execute(
                "UPDATE audit_event SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (entry.actor, prev, digest, seq),
            )
        connection.execute(f"DELETE FROM audit_event WHERE seq > {CHECKPOINT}")
        connection.execute("DELETE FROM audit_checkpoint")
    unnoticed = {
        "ok": True,
        "checked": CHECKPOINT,
        "first_bad_seq": None,
        "problem": "",
        "last_checkpoint_seq": None,
        "warning": "",
    }
    assert verify(home) == (0, unnoticed), "without the exported checkpoint, nothing to see"
    code, verdict = verify(home, "--checkpoint", str(tmp_path / "checkpoint.json"))
    assert code == 1
    assert verdict["problem"] == (
        f"exported checkpoint at {CHECKPOINT} does not match record {CHECKPOINT} "
        f"(records 1 to {CHECKPOINT} were rewritten)"
    )


def test_an_exported_checkpoint_signed_by_another_key_is_refused(
    home: Path, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.json"
    export_checkpoint(home, path)
    document = json.loads(path.read_text())
    impostor = LocalSigner.generate()  # well-formed, over the right head, by the wrong key
    message = checkpoint_message(document["seq"], document["hash"])
    document["signature"] = base64.b64encode(impostor.sign(message)).decode("ascii")
    path.write_text(json.dumps(document))
    code, verdict = verify(home, "--checkpoint", str(path))
    assert code == 1
    assert verdict["problem"] == (
        f"exported checkpoint signature invalid (checkpoint at {CHECKPOINT})"
    )


def test_the_exported_checkpoint_catches_an_audit_key_replaced_on_the_box(
    home: Path, tmp_path: Path
) -> None:
    """Whoever can write the home can swap ca/audit.pub for a key of their own and sign the
    registry's checkpoints with it; the exported checkpoint was signed with the real key."""
    path = tmp_path / "checkpoint.json"
    export_checkpoint(home, path)
    impostor = LocalSigner.generate()
    with SqlStore(load_settings(home).database) as store:
        (checkpoint,) = store.checkpoints()
    signature = impostor.sign(checkpoint_message(checkpoint.seq, checkpoint.hash))
    sql(home, "UPDATE audit_checkpoint SET signature = ?", parameters=(signature,))
    (home / "ca" / "audit.pub").write_bytes(
        impostor.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    assert verify(home)[0] == 0, "the registry alone vouches for the impostor's checkpoints"
    code, verdict = verify(home, "--checkpoint", str(path))
    assert code == 1
    assert verdict["problem"] == (
        f"exported checkpoint signature invalid (checkpoint at {CHECKPOINT})"
    )


def test_the_exported_checkpoint_passes_an_untouched_trail(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    export_checkpoint(home, path)
    code, verdict = verify(home, "--checkpoint", str(path))
    assert code == 0 and verdict["checked"] == RECORDS
    result = runner.invoke(app, ["audit", "verify", "--home", str(home), "--checkpoint", str(path)])
    assert result.exit_code == 0
    assert f"matches the exported checkpoint at {CHECKPOINT}" in one_line(result.output)


def test_the_exported_checkpoint_is_a_small_json_document(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    result = runner.invoke(app, ["audit", "checkpoint", "--home", str(home), "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert "keep it off this machine" in one_line(result.output)
    document = json.loads(path.read_text())
    with SqlStore(load_settings(home).database) as store:
        head = store.audit_records()[CHECKPOINT - 1]
    assert document["type"] == "fleetgate-audit-checkpoint" and document["version"] == 1
    assert (document["seq"], document["hash"]) == (CHECKPOINT, head.hash)
    assert len(path.read_bytes()) < 1024
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "not JSON"),
        ('{"type": "something-else"}', "not an exported audit checkpoint"),
        (None, "missing field signature"),
        ("", "not JSON"),
        ("[" * 200_000, "too large for an exported checkpoint"),
        ("[" * 3_000, "nested too deeply"),
    ],
    ids=["garbage", "foreign_document", "missing_signature", "empty", "huge", "deeply_nested"],
)
def test_an_unreadable_exported_checkpoint_fails_the_check(
    home: Path, tmp_path: Path, content: str | None, reason: str
) -> None:
    path = tmp_path / "checkpoint.json"
    export_checkpoint(home, path)
    if content is None:
        document = json.loads(path.read_text())
        del document["signature"]
        content = json.dumps(document)
    path.write_text(content)
    code, verdict = verify(home, "--checkpoint", str(path))
    assert code == 1 and verdict["ok"] is False
    assert str(verdict["problem"]).startswith(f"cannot use the exported checkpoint {path}: ")
    assert reason in str(verdict["problem"])
    human = runner.invoke(app, ["audit", "verify", "--home", str(home), "--checkpoint", str(path)])
    assert human.exit_code == 1 and reason in one_line(human.output)


def test_a_missing_exported_checkpoint_fails_the_check(home: Path, tmp_path: Path) -> None:
    code, verdict = verify(home, "--checkpoint", str(tmp_path / "absent.json"))
    assert code == 1
    assert "No such file or directory" in str(verdict["problem"])


def test_a_trail_longer_than_one_interval_without_checkpoints_is_warned_of(home: Path) -> None:
    """Such a trail may have lost its checkpoints, or may have been written by commands while no
    gateway ran: the check says so, without failing a scheduled run on an innocent home."""
    sql(home, "DELETE FROM audit_checkpoint")
    code, verdict = verify(home)
    assert code == 0 and verdict["ok"] is True
    assert str(verdict["warning"]).startswith(
        f"no checkpoint, yet the trail holds {RECORDS} records and a running gateway signs "
        f"every {CHECKPOINT}"
    )


def test_a_trail_of_one_interval_without_checkpoints_passes(home: Path) -> None:
    """A gateway signs once audit_checkpoint_every records have passed: fewer, unsigned, is a
    young trail, not evidence of tampering."""
    sql(home, "DELETE FROM audit_checkpoint", f"DELETE FROM audit_event WHERE seq > {CHECKPOINT}")
    code, verdict = verify(home)
    assert code == 0 and verdict["checked"] == CHECKPOINT
    assert verdict["warning"] == ""


def test_exporting_without_a_checkpoint_fails(home: Path, tmp_path: Path) -> None:
    sql(home, "DELETE FROM audit_checkpoint")
    path = tmp_path / "checkpoint.json"
    result = runner.invoke(app, ["audit", "checkpoint", "--home", str(home), "-o", str(path)])
    assert result.exit_code == 1
    assert "no signed checkpoint yet" in one_line(result.output)
    assert not path.exists()


def test_a_forged_checkpoint_is_not_exported(home: Path, tmp_path: Path) -> None:
    _forge_checkpoint(home)
    path = tmp_path / "checkpoint.json"
    result = runner.invoke(app, ["audit", "checkpoint", "--home", str(home), "-o", str(path)])
    assert result.exit_code == 1
    assert "not signed by this home's audit key" in one_line(result.output)
    assert not path.exists()
