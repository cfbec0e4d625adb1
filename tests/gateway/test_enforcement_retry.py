"""A change another process made (the CLI, another gateway) is enforced by the audit poll; when
the broker fails at that moment, the next poll tries again instead of forgetting it (the
reload that found the change does not report it twice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_store_contract import entry, identity

from gateway.config import load_settings
from gateway.home import init_home
from gateway.service import Gateway
from gateway.store import IdentityState
from gateway.store_memory import MemoryStore


class FlakyBroker:
    """Refuses the first ``failures`` changes, then records them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.applied: list[tuple[str, IdentityState]] = []

    async def apply(self, identity_id: str, state: IdentityState, *, kind: Any = None) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("admin connection lost")
        self.applied.append((identity_id, state))

    async def publish_crl(self, crl_pem: bytes) -> None:
        pass


async def test_a_change_the_broker_refused_is_enforced_at_the_next_poll(tmp_path: Path) -> None:
    init_home(tmp_path)
    store = MemoryStore()
    store.put_identity(identity("dev-1"))
    gateway = Gateway(load_settings(tmp_path), store=store, broker_kind="embedded")
    broker = FlakyBroker(failures=1)
    gateway.broker = broker  # type: ignore[assignment]
    gateway.states.refresh()
    # the CLI quarantines the device: a registry row and its audit event
    quarantine = entry("quarantine")
    store.change_state("dev-1", IdentityState.QUARANTINED, quarantine.at, audit=[quarantine])
    with pytest.raises(ConnectionError):  # logged by the periodic job that runs the poll
        await gateway._sync_states()
    assert broker.applied == []
    assert gateway.metrics["enforce.retry"] == 1
    await gateway._sync_states()  # no new audit event, but the change is still owed
    assert broker.applied == [("dev-1", IdentityState.QUARANTINED)]
    await gateway._sync_states()  # and only once
    assert broker.applied == [("dev-1", IdentityState.QUARANTINED)]
