"""Ended sessions are forgotten without touching a session that took their place."""

from __future__ import annotations

import pytest

from gateway.broker.amqtt_glue import CompactSession, FilteringBroker


class Handler:
    """Stands in for amqtt's protocol handler; ``on_stop`` runs inside the clean-up's await."""

    def __init__(self, on_stop: object = None) -> None:
        self.stopped = False
        self.on_stop = on_stop

    async def stop(self) -> None:
        self.stopped = True
        if callable(self.on_stop):
            self.on_stop()


def session(client_id: str, state: str, *, clean: bool = True) -> CompactSession:
    made = CompactSession()
    made.client_id = client_id
    made.clean_session = clean
    if state == "connected":
        made.transitions.connect()
    elif state == "disconnected":
        made.transitions.disconnect()
    return made


@pytest.fixture
async def broker() -> FilteringBroker:
    return FilteringBroker(
        {"listeners": {"default": {"type": "external", "bind": None}}, "plugins": {}},
        permits=lambda *_: True,
    )


async def test_ended_clean_sessions_go_and_live_or_persistent_ones_stay(
    broker: FilteringBroker,
) -> None:
    ended, live = session("d1", "disconnected"), session("d2", "connected")
    kept = session("d3", "disconnected", clean=False)  # persistent, not expired yet
    broker._sessions.update(
        {"d1": (ended, Handler()), "d2": (live, Handler()), "d3": (kept, Handler())}
    )
    await broker._expire_sessions()
    assert set(broker._sessions) == {"d2", "d3"}


async def test_a_session_that_reconnected_during_the_clean_up_is_kept(
    broker: FilteringBroker,
) -> None:
    """d2 ended; while d1's clean-up awaits, d2 comes back under the same client id (an
    enrollee opening its operational session). amqtt's own monitor then removed the new d2."""
    old_d2 = session("d2", "disconnected")
    new_d2 = session("d2", "connected")
    new_handler = Handler()

    def d2_reconnects() -> None:
        broker._sessions["d2"] = (new_d2, new_handler)

    broker._sessions.update(
        {
            "d1": (session("d1", "disconnected"), Handler(on_stop=d2_reconnects)),
            "d2": (old_d2, Handler()),
        }
    )
    await broker._expire_sessions()
    assert broker._sessions == {"d2": (new_d2, new_handler)}
    assert not new_handler.stopped
