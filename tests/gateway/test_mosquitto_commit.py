"""GroupCommit: what goes in which $CONTROL message, and who hears what back. The exchange here
is a stand-in for the broker that answers each message when the test lets it (a real Mosquitto
answers too fast to hold a message in flight; tests/gateway/test_mosquitto_broker.py drives
the group commit against one)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.mosquitto import dynsec
from gateway.mosquitto.commit import GroupCommit
from gateway.mosquitto.errors import MosquittoError, MosquittoReason


class Broker:
    """Answers each message once ``release()`` lets it; a command is refused when its role
    name starts with "bad"; ``cost`` seconds per command on the fake clock."""

    def __init__(self, *, cost: float = 0.001, hold: bool = True) -> None:
        self.messages: list[list[str]] = []
        self.now = 0.0
        self.cost = cost
        self.hold = hold
        self.fail_next: MosquittoError | None = None
        self._gates: asyncio.Queue[None] = asyncio.Queue()
        self.arrived = asyncio.Event()

    def clock(self) -> float:
        return self.now

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._gates.put_nowait(None)

    async def exchange(
        self, batch: tuple[dynsec.Command, ...]
    ) -> tuple[dynsec.CommandResult, ...]:
        self.messages.append([str(c.args["rolename"]) for c in batch])
        self.arrived.set()
        if self.hold:
            await self._gates.get()
        self.now += self.cost * len(batch)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return tuple(
            dynsec.CommandResult(
                c.name,
                i,
                "Role not found" if str(c.args["rolename"]).startswith("bad") else None,
            )
            for i, c in enumerate(batch)
        )


def role(name: str) -> dynsec.Command:
    return dynsec.modify_role_acls(name, ())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def in_flight(broker: Broker, count: int) -> None:
    """Wait until ``count`` messages have reached the broker."""
    while len(broker.messages) < count:
        broker.arrived.clear()
        await broker.arrived.wait()


async def test_changes_submitted_while_a_message_is_in_flight_go_together_in_the_next() -> None:
    broker = Broker()
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    first = asyncio.create_task(commit.submit([role("a")]))
    await in_flight(broker, 1)
    others = [asyncio.create_task(commit.submit([role(f"d{i}"), role(f"e{i}")])) for i in range(4)]
    await settle()
    assert broker.messages == [["a"]]  # nothing else is sent while the first is answered
    broker.release(2)
    assert [r.command for r in await first] == ["modifyRole"]
    results = await asyncio.gather(*others)
    assert broker.messages[1] == ["d0", "e0", "d1", "e1", "d2", "e2", "d3", "e3"]
    assert all(len(mine) == 2 for mine in results)  # each caller gets its own answers
    assert (commit.messages, commit.commands) == (2, 9)


async def test_a_refused_command_fails_only_the_change_it_belongs_to() -> None:
    broker = Broker(hold=False)
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    good, bad, also_good = await asyncio.gather(
        commit.submit([role("a"), role("b")]),
        commit.submit([role("c"), role("bad-d")]),
        commit.submit([role("e")]),
        return_exceptions=True,
    )
    assert len(broker.messages) == 1
    assert isinstance(good, tuple) and isinstance(also_good, tuple)
    assert isinstance(bad, MosquittoError) and bad.reason is MosquittoReason.COMMAND_FAILED
    assert bad.failures == (("modifyRole bad-d", "Role not found"),)


async def test_a_message_without_an_answer_fails_its_changes_and_the_next_one_goes_out() -> None:
    broker = Broker()
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    lost = asyncio.create_task(commit.submit([role("a")]))
    await in_flight(broker, 1)
    later = asyncio.create_task(commit.submit([role("b")]))
    broker.fail_next = MosquittoError(MosquittoReason.NO_RESPONSE, "no answer")
    broker.release(2)
    with pytest.raises(MosquittoError) as caught:
        await lost
    assert caught.value.reason is MosquittoReason.NO_RESPONSE
    assert len(await later) == 1
    assert broker.messages == [["a"], ["b"]]


async def test_urgent_changes_overtake_queued_ones_and_bring_their_identitys_along() -> None:
    broker = Broker()
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    tasks = [asyncio.create_task(commit.submit([role("busy")]))]
    await in_flight(broker, 1)
    tasks += [
        asyncio.create_task(commit.submit([role(name)], key=name)) for name in ("n1", "x", "n2")
    ]
    await settle()
    # x's earlier change must not land after its urgent one: it comes along, in order
    tasks.append(asyncio.create_task(commit.submit([role("x-urgent")], urgent=True, key="x")))
    tasks.append(asyncio.create_task(commit.submit([role("q")], urgent=True)))
    await settle()
    broker.release(2)
    await asyncio.gather(*tasks)
    assert broker.messages == [["busy"], ["x", "x-urgent", "q", "n1", "n2"]]


async def test_a_message_holds_what_fits_in_the_budget_at_the_cost_learned() -> None:
    broker = Broker(cost=0.010, hold=False)  # 10 ms per command, as a large dynsec file
    commit = GroupCommit(broker.exchange, max_commands=200, budget=0.030, clock=broker.clock)
    assert commit.limit() == 8  # before any answer: a cautious first guess
    await commit.submit([role("warm-up")])
    assert commit.seconds_per_command == pytest.approx(0.010)
    assert commit.limit() == 3
    broker.hold = True
    first = asyncio.create_task(commit.submit([role("a")]))
    await in_flight(broker, 2)
    rest = [asyncio.create_task(commit.submit([role(f"r{i}")])) for i in range(7)]
    big = asyncio.create_task(commit.submit([role(f"big{i}") for i in range(5)]))
    await settle()
    broker.release(10)
    await asyncio.gather(first, big, *rest)
    sizes = [len(message) for message in broker.messages[2:]]
    assert sizes == [3, 3, 1, 5]  # never more than fits; a larger unit goes alone, unsplit


async def test_a_caller_that_gave_up_before_sending_sends_nothing() -> None:
    broker = Broker()
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    first = asyncio.create_task(commit.submit([role("a")]))
    await in_flight(broker, 1)
    abandoned = asyncio.create_task(commit.submit([role("gone")]))
    kept = asyncio.create_task(commit.submit([role("kept")]))
    await settle()
    abandoned.cancel()
    broker.release(2)
    await asyncio.gather(first, kept)
    assert broker.messages == [["a"], ["kept"]]


async def test_close_fails_every_queued_change() -> None:
    broker = Broker()
    commit = GroupCommit(broker.exchange, max_commands=100, budget=1.0, clock=broker.clock)
    sent = asyncio.create_task(commit.submit([role("a")]))
    await in_flight(broker, 1)
    queued = asyncio.create_task(commit.submit([role("b")]))
    await settle()
    await commit.close()
    for task in (sent, queued):
        with pytest.raises(MosquittoError) as caught:
            await task
        assert caught.value.reason is MosquittoReason.NOT_RUNNING
    assert broker.messages == [["a"]]


async def test_answers_that_do_not_add_up_fail_the_message() -> None:
    async def short(batch: tuple[dynsec.Command, ...]) -> tuple[dynsec.CommandResult, ...]:
        return (dynsec.CommandResult("modifyRole", 0),)

    commit = GroupCommit(short, max_commands=10, budget=1.0)
    assert len(await commit.submit([role("a")])) == 1
    together = await asyncio.gather(
        commit.submit([role("b")]), commit.submit([role("c")]), return_exceptions=True
    )
    for outcome in together:  # one answer for two commands: nobody can tell whose it is
        assert isinstance(outcome, MosquittoError)
        assert outcome.reason is MosquittoReason.BAD_RESPONSE


def test_limits_are_checked() -> None:
    async def never(batch: tuple[dynsec.Command, ...]) -> tuple[dynsec.CommandResult, ...]:
        raise AssertionError("not sent")

    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            GroupCommit(never, max_commands=bad, budget=1.0)
    for seconds in (0, -0.5):
        with pytest.raises(ValueError):
            GroupCommit(never, max_commands=3, budget=seconds)


async def test_a_change_larger_than_a_message_is_refused_before_sending() -> None:
    broker = Broker(hold=False)
    commit = GroupCommit(broker.exchange, max_commands=2, budget=1.0)
    with pytest.raises(ValueError):
        await commit.submit([role("a"), role("b"), role("c")])
    assert await commit.submit([]) == ()
    assert broker.messages == []
