"""Who is connected, read from Mosquitto 2.0.11's connection notices (lines as it writes
them)."""

from __future__ import annotations

import pytest

from gateway.mosquitto import Connected, Disconnected, Session, SessionTracker


def fed(*lines: str) -> SessionTracker:
    tracker = SessionTracker()
    for line in lines:
        tracker.feed(line)
    return tracker


def test_a_certificate_client_is_seen_with_its_listener_and_username() -> None:
    tracker = fed("1796400991: New connection from 127.0.0.1:45599 on port 18831.")
    change = tracker.feed(
        "1796400991: New client connected from 127.0.0.1:45599 as devA (p2, c1, k60, u'devA')."
    )
    devA = Session("devA", 18831, "devA", "127.0.0.1:45599")
    assert change == Connected(devA)
    assert tracker.sessions() == {"devA": devA}
    assert "devA" in tracker


def test_a_bridge_is_seen_like_a_client() -> None:
    # what 2.0.11 logs for a bridge that connected with try_private
    tracker = fed("New connection from 127.0.0.1:51800 on port 42587.")
    change = tracker.feed(
        "New bridge connected from 127.0.0.1:51800 as _fg_req-7d07 (p2, c1, k30, u'_fg_bridge')."
    )
    bridge = Session("_fg_req-7d07", 42587, "_fg_bridge", "127.0.0.1:51800")
    assert change == Connected(bridge)
    assert tracker.feed("Client _fg_req-7d07 closed its connection.") == Disconnected(bridge)


def test_an_anonymous_client_has_no_username() -> None:
    tracker = fed(
        "New connection from 127.0.0.1:45052 on port 18832.",
        "New client connected from 127.0.0.1:45052 as enr 1 (p2, c1, k60).",
    )
    assert tracker.sessions()["enr 1"] == Session("enr 1", 18832, None, "127.0.0.1:45052")


@pytest.mark.parametrize(
    "goodbye",
    [
        "Client devA disconnected.",
        "Client devA closed its connection.",
        "Client devA been disconnected by administrative action.",
        "Client devA has exceeded timeout, disconnecting.",
        "Client devA disconnected due to out of memory.",
        "Client devA disconnected: Protocol error.",
        "Socket error on client devA, disconnecting.",
    ],
)
def test_every_kind_of_disconnect_ends_the_session(goodbye: str) -> None:
    tracker = fed(
        "New connection from 127.0.0.1:1 on port 1.",
        "New client connected from 127.0.0.1:1 as devA (p2, c1, k60, u'devA').",
    )
    change = tracker.feed(f"1796400993: {goodbye}")
    assert change == Disconnected(Session("devA", 1, "devA", "127.0.0.1:1"))
    assert tracker.sessions() == {}


def test_a_takeover_keeps_the_client_with_its_new_connection() -> None:
    tracker = fed(
        "New connection from 127.0.0.1:1 on port 18831.",
        "New client connected from 127.0.0.1:1 as devA (p2, c1, k60, u'devA').",
        "New connection from 127.0.0.1:2 on port 18831.",
        "Client devA already connected, closing old connection.",
        "New client connected from 127.0.0.1:2 as devA (p2, c1, k60, u'devA').",
    )
    assert tracker.sessions()["devA"].address == "127.0.0.1:2"


def test_a_connect_for_a_live_client_id_is_reported_as_a_takeover() -> None:
    # What 2.0.11 puts on the notice topic when a second connection takes a session over (the
    # "already connected" line is logged at error level and does not come).
    tracker = fed(
        "New connection from 127.0.0.1:1 on port 18831.",
        "New client connected from 127.0.0.1:1 as devA (p2, c1, k60, u'devA').",
        "New connection from 127.0.0.2:2 on port 18831.",
    )
    takeover = tracker.feed(
        "1796400991: New client connected from 127.0.0.2:2 as devA (p2, c1, k60, u'devA')."
    )
    assert takeover == Connected(
        session=Session("devA", 18831, "devA", "127.0.0.2:2"),
        replaced=Session("devA", 18831, "devA", "127.0.0.1:1"),
    )


def test_a_reconnect_after_a_disconnect_is_no_takeover() -> None:
    tracker = fed(
        "New connection from 127.0.0.1:1 on port 18831.",
        "New client connected from 127.0.0.1:1 as devA (p2, c1, k60, u'devA').",
        "Client devA disconnected.",
        "New connection from 127.0.0.2:2 on port 18831.",
    )
    assert tracker.feed("New client connected from 127.0.0.2:2 as devA (p2, c1, k60).") == (
        Connected(Session("devA", 18831, None, "127.0.0.2:2"))
    )
    assert tracker.feed("Client devA already connected, closing old connection.") is None
    assert tracker.feed("New connection from 127.0.0.2:3 on port 18831.") is None


def test_unrelated_lines_and_failed_handshakes_change_nothing() -> None:
    tracker = SessionTracker()
    for line in (
        "New connection from 127.0.0.1:9 on port 18831.",
        "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
        "Client <unknown> disconnected: Protocol error.",
        "Client devZ disconnected.",  # never seen connecting: nothing ended
        "dynsec: ctl/admin | createRole | rolename=dev-a",
        "Connecting bridge (step 1) fleetgate-requests (127.0.0.1:42587)",
        "",
    ):
        assert tracker.feed(line) is None
    assert tracker.sessions() == {}


def test_a_connect_whose_connection_line_was_missed_has_no_port() -> None:
    tracker = fed("New client connected from 10.0.0.1:7 as devB (p2, c0, k30, u'devB').")
    assert tracker.sessions()["devB"].port is None


def test_refused_handshakes_cannot_grow_the_table_without_bound() -> None:
    tracker = fed(*(f"New connection from 10.0.0.1:{n} on port 1." for n in range(10_000)))
    assert len(tracker._pending) <= 4096
    tracker.feed("New client connected from 10.0.0.1:9999 as late (p2, c1, k60).")
    assert tracker.sessions()["late"].port == 1


def test_clear_forgets_everyone_and_says_who_was_there() -> None:
    tracker = fed("New client connected from 127.0.0.1:1 as devA (p2, c1, k60, u'devA').")
    assert tracker.clear() == [Session("devA", None, "devA", "127.0.0.1:1")]
    assert tracker.sessions() == {}
    assert tracker.clear() == []


def test_only_text_is_fed() -> None:
    with pytest.raises(TypeError):
        SessionTracker().feed(b"Client devA disconnected.")  # type: ignore[arg-type]
