"""Bulk actions: chunks under the request cap, and one result per device whatever fails."""

from __future__ import annotations

from typing import Any

import pytest

from console.bridge import RequestFailure
from console.bulk import MISSING_RESULT, BulkAction, DeviceResult, results_from_reply


class Gateway:
    """Answers each chunk at once: ok for even ids, forbidden for odd, or a scripted failure."""

    def __init__(self, fail_chunk: int | None = None) -> None:
        self.requests: list[tuple[str, dict[str, Any], float]] = []
        self.fail_chunk = fail_chunk

    def send(self, op: str, args: dict[str, Any], reply: Any, *, timeout: float = 10.0) -> None:
        self.requests.append((op, args, timeout))
        if self.fail_chunk == len(self.requests) - 1:
            reply(None, RequestFailure("timeout", "no reply from the gateway"))
            return
        results = []
        for identity_id in args["ids"]:
            if int(identity_id.split("-")[1]) % 2 == 0:
                results.append({"id": identity_id, "ok": True, "state": "quarantined"})
            else:
                error = {"reason": "not_found", "detail": "x"}
                results.append({"id": identity_id, "ok": False, "error": error})
        reply({"results": results}, None)


def run(gateway: Gateway, ids: list[str], chunk_size: int = 3) -> list[DeviceResult]:
    done: list[list[DeviceResult]] = []
    BulkAction("quarantine", ids, "test", gateway.send, done.append, chunk_size=chunk_size).start()
    assert len(done) == 1
    return done[0]


def test_ids_go_out_in_chunks_and_every_id_gets_its_own_result() -> None:
    gateway = Gateway()
    ids = [f"th-{n}" for n in range(8)]
    results = run(gateway, ids)
    assert [len(args["ids"]) for _, args, _ in gateway.requests] == [3, 3, 2]
    assert all(args["reason"] == "test" for _, args, _ in gateway.requests)
    assert [r.id for r in results] == ids
    assert [r.ok for r in results] == [n % 2 == 0 for n in range(8)]
    assert results[1].reason == "not_found"


def test_a_failed_chunk_fails_its_ids_and_the_others_still_run() -> None:
    gateway = Gateway(fail_chunk=1)
    ids = [f"th-{n}" for n in range(8)]
    results = run(gateway, ids)
    assert len(gateway.requests) == 3
    assert [r.reason for r in results[3:6]] == ["timeout"] * 3
    assert results[0].ok and results[6].ok


def test_an_id_the_gateway_left_out_is_a_failure_not_a_success() -> None:
    results = results_from_reply(["a", "b"], {"results": [{"id": "a", "ok": True}]})
    assert results[0].ok
    assert not results[1].ok and results[1].reason == MISSING_RESULT


def test_garbage_in_a_reply_is_not_mistaken_for_results() -> None:
    results = results_from_reply(["a"], {"results": [7, {"id": 3}, {"ok": True}]})
    assert results == [results[0]] and results[0].reason == MISSING_RESULT
    results = results_from_reply(["a"], {"results": "all good"})
    assert results[0].reason == MISSING_RESULT
    results = results_from_reply(["a"], {"results": [{"id": "a", "ok": False, "error": "x"}]})
    assert results[0].reason == "failed"


@pytest.mark.parametrize(
    ("action", "ids", "chunk"),
    [("delete", ["a"], 10), ("revoke", [], 10), ("revoke", ["a"], 0)],
)
def test_a_bulk_action_refuses_bad_arguments(action: str, ids: list[str], chunk: int) -> None:
    with pytest.raises(ValueError):
        BulkAction(action, ids, "r", lambda *a, **k: None, lambda r: None, chunk_size=chunk)


@pytest.mark.parametrize(
    "fields",
    [{"id": "", "ok": True}, {"id": "a", "ok": True, "reason": "x"}, {"id": "a", "ok": False}],
)
def test_a_device_result_is_consistent(fields: dict) -> None:
    with pytest.raises(ValueError):
        DeviceResult(**fields)


def test_a_request_failure_keeps_the_reason_of_any_error_that_has_one() -> None:
    class Shaped(Exception):
        reason = "forbidden"
        detail = "needs admin"

    assert RequestFailure.from_exception(Shaped()) == RequestFailure("forbidden", "needs admin")
    assert RequestFailure.from_exception(RuntimeError("boom")).reason == "client_failed"
    with pytest.raises(ValueError):
        RequestFailure("")
