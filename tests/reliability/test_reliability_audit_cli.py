"""`fleetgate audit verify` on a real home: an audit trail written by real enrollments into the
SQLite registry, signed with the home's audit key, then tampered with through SQLite itself.

tests/gateway/test_audit.py proves ``verify_chain`` on records; this proves the command an
auditor runs: it reads the registry and the public key from the home, exits 1 and names the
first bad record for each kind of tampering, and exits 0 on an untouched trail.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.audit import AuditWriter
from gateway.cli import app
from gateway.config import load_settings
from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.home import AUDIT_KEY, load_keys
from gateway.protocol import Error, IssuedCertificate
from gateway.registry import SqlStore

runner = CliRunner()
RECORDS = 16  # 8 devices: an enrollment and a refused replay of its nonce each
CHECKPOINT = 10


def verify(home: Path) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["audit", "verify", "--home", str(home), "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose registry holds RECORDS audit records from real enrollments, checkpointed
    at CHECKPOINT by the home's audit key (made once; each test works on a copy)."""
    home = tmp_path_factory.mktemp("audit") / "gw"
    assert runner.invoke(app, ["init", "--home", str(home)]).exit_code == 0
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


@pytest.mark.parametrize(
    ("attack", "first_bad", "problem"),
    [
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
    ],
    ids=lambda value: getattr(value, "__name__", None),
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
