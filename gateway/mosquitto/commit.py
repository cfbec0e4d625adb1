"""Group commit of dynamic-security commands: one ``$CONTROL`` message in flight at a time, and
everything submitted meanwhile goes together in the next one.

Many enrollments finish at once, and each admits its device on the broker before the device
gets its certificate. Sent one message per caller, they queue up inside Mosquitto (it reads
one message at a time and answers it whole), and a quarantine sent behind them waits for all
of them. Here callers ``submit`` a *unit* (the commands of one change, never split across two
messages) and wait; a single sender sends the queued units as one message, waits for the
answer, and resumes each caller with the answers to its own commands. A command the plugin
refuses fails only the unit it belongs to (``MosquittoError(COMMAND_FAILED)``, as for a message
of its own); a message without an answer fails every unit in it.

Urgent units (quarantine, revocation, kicks) go first in the next message. A message is capped
by time, not only by count: the plugin of Mosquitto 2.0 rewrites its whole file per accepted
command (``dynsec``), so what one command costs grows with the fleet (16 ms at 1,000 devices
here). The sender learns that cost from the answers it gets and puts no more commands in a
message than fit in ``budget`` seconds (at least one unit), so an urgent unit waits at most
for about one budget behind the message in flight, whatever the load.

Units with the same ``key`` (an identity) leave in the order they were submitted: an urgent
unit takes the queued units of its key along with it to the front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.mosquitto.dynsec import Command, CommandResult, check_refusals
from gateway.mosquitto.errors import MosquittoError, MosquittoReason

__all__ = ["Exchange", "GroupCommit"]

log = logging.getLogger(__name__)

Exchange = Callable[[tuple[Command, ...]], Awaitable[tuple[CommandResult, ...]]]
"""Send one message of commands; return one result per command, in order. Raises
MosquittoError for what concerns the whole message (no connection, no answer, a malformed
answer), never for a refused command."""

_EWMA = 0.3  # weight of the latest message in the learned cost per command
_FIRST_GUESS = 8  # commands in a message before any answer has taught the cost


@dataclass(eq=False)
class _Unit:
    commands: tuple[Command, ...]
    key: str | None
    future: asyncio.Future[tuple[CommandResult, ...]] = field(repr=False)


class GroupCommit:
    """Submit units with ``await submit(commands)``; ``close()`` fails whatever is queued."""

    def __init__(
        self,
        exchange: Exchange,
        *,
        max_commands: int,
        budget: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_commands, bool) or not isinstance(max_commands, int) or max_commands < 1:
            raise ValueError("max_commands must be a positive int")
        if not isinstance(budget, int | float) or isinstance(budget, bool) or budget <= 0:
            raise ValueError("budget must be a positive number of seconds")
        self._exchange = exchange
        self._max_commands = max_commands
        self._budget = float(budget)
        self._clock = clock
        self._urgent: deque[_Unit] = deque()
        self._normal: deque[_Unit] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._seconds_per_command: float | None = None
        self.messages = 0  # sent, for the benchmarks and tests
        self.commands = 0

    @property
    def queued(self) -> int:
        return len(self._urgent) + len(self._normal)

    @property
    def seconds_per_command(self) -> float | None:
        """What one command has cost lately (None before the first answer)."""
        return self._seconds_per_command

    def limit(self) -> int:
        """How many commands the next message may hold (more only for a single larger unit)."""
        if self._seconds_per_command is None:
            return min(self._max_commands, _FIRST_GUESS)
        fit = int(self._budget / max(self._seconds_per_command, 1e-6))
        return max(1, min(self._max_commands, fit))

    async def submit(
        self, commands: Sequence[Command], *, urgent: bool = False, key: str | None = None
    ) -> tuple[CommandResult, ...]:
        """Send ``commands`` in one message (with others' units) and return their results in
        order. Raises MosquittoError: COMMAND_FAILED when the plugin refused one of them,
        ADMIN_UNAVAILABLE / NO_RESPONSE / BAD_RESPONSE when the message failed."""
        batch = tuple(commands)
        if not batch:
            return ()
        if len(batch) > self._max_commands:
            raise ValueError(f"{len(batch)} commands exceed one message ({self._max_commands})")
        unit = _Unit(batch, key, asyncio.get_running_loop().create_future())
        if urgent:
            if key is not None:
                self._promote(key)
            self._urgent.append(unit)
        else:
            self._normal.append(unit)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all(), name="dynsec-group-commit")
        try:
            return await unit.future
        except asyncio.CancelledError:
            self._drop(unit)  # not sent yet: nobody wants it any more
            raise

    def promote(self, key: str) -> None:
        """Move the queued units of ``key`` to the urgent queue (an urgent change of that
        identity waits for them)."""
        self._promote(key)

    def _promote(self, key: str) -> None:
        taken = [unit for unit in self._normal if unit.key == key]
        if not taken:
            return
        self._normal = deque(unit for unit in self._normal if unit.key != key)
        self._urgent.extend(taken)

    def _drop(self, unit: _Unit) -> None:
        for queue in (self._urgent, self._normal):
            with contextlib.suppress(ValueError):
                queue.remove(unit)

    def _take(self) -> list[_Unit]:
        limit = self.limit()
        taken: list[_Unit] = []
        count = 0
        for queue in (self._urgent, self._normal):
            while queue:
                unit = queue[0]
                if taken and count + len(unit.commands) > limit:
                    return taken
                queue.popleft()
                if unit.future.done():  # its caller gave up
                    continue
                taken.append(unit)
                count += len(unit.commands)
        return taken

    async def _send_all(self) -> None:
        while self._urgent or self._normal:
            units = self._take()
            if not units:
                continue
            batch = tuple(command for unit in units for command in unit.commands)
            started = self._clock()
            try:
                results = await self._exchange(batch)
            except MosquittoError as exc:
                for unit in units:
                    _fail(unit, exc)
                continue
            except asyncio.CancelledError:
                error = MosquittoError(MosquittoReason.NOT_RUNNING, "the broker is stopping")
                for unit in units:
                    _fail(unit, error)
                raise
            except Exception as exc:  # a bug in the exchange must not strand the callers
                log.exception("dynsec exchange failed")
                error = MosquittoError(MosquittoReason.BAD_RESPONSE, repr(exc))
                for unit in units:
                    _fail(unit, error)
                continue
            self._learn(len(batch), self._clock() - started)
            self._answer(units, results)

    def _learn(self, commands: int, seconds: float) -> None:
        self.messages += 1
        self.commands += commands
        cost = max(seconds, 0.0) / commands
        previous = self._seconds_per_command
        self._seconds_per_command = cost if previous is None else (
            _EWMA * cost + (1 - _EWMA) * previous
        )

    def _answer(self, units: list[_Unit], results: tuple[CommandResult, ...]) -> None:
        total = sum(len(unit.commands) for unit in units)
        if len(results) != total:
            error = MosquittoError(
                MosquittoReason.BAD_RESPONSE, f"{len(results)} answers for {total} commands"
            )
            for unit in units:
                _fail(unit, error)
            return
        offset = 0
        for unit in units:
            mine = results[offset : offset + len(unit.commands)]
            offset += len(unit.commands)
            if unit.future.done():
                continue
            try:
                check_refusals(unit.commands, mine)
            except MosquittoError as exc:
                unit.future.set_exception(exc)
            else:
                unit.future.set_result(mine)

    async def close(self) -> None:
        """Stop sending; every queued unit fails with NOT_RUNNING."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        error = MosquittoError(MosquittoReason.NOT_RUNNING, "the broker is stopping")
        for queue in (self._urgent, self._normal):
            while queue:
                _fail(queue.popleft(), error)


def _fail(unit: _Unit, error: MosquittoError) -> None:
    if not unit.future.done():
        unit.future.set_exception(error)
