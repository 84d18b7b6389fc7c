"""One QMP session over a unix socket, driven synchronously from a private event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping, Sequence
    from pathlib import Path

    from qemu.qmp import Message


class QmpRefused(Exception):
    """QEMU answered a command with a QMP error: its class and exact description."""

    def __init__(self, error_class: str, desc: str) -> None:
        """Keep QEMU's error class and text."""
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class QmpGone(Exception):
    """The QMP socket closed (QEMU quit, crashed, or was killed)."""


class QmpTimeout(Exception):
    """QEMU did not answer in time."""


class _Client(QMPClient):
    """A QMPClient that keeps each event with the number of replies read before it.

    The count places every event between two replies in the order QEMU wrote them, so a
    caller can send a fence and its command together and still tell which events came
    before the fence.  ``_cb_inbound`` is the library's hook for subclasses to see every
    inbound message in order; events are kept here rather than in ``self.events`` (the
    default listener, which cannot be removed, is told to accept none).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events.event_filter = lambda _: False
        #: Replies (``return`` or ``error``) read so far.
        self.replies = 0
        #: Events not taken yet: (replies read before the event, the event).
        self.arrived: collections.deque[tuple[int, Message]] = collections.deque()
        self._arrival = asyncio.Event()
        # While a batch is sent its messages are gathered here and written at once.
        self._corked: list[bytes] | None = None

    def cork(self) -> None:
        """Hold the messages sent from now on until :meth:`uncork` (or the next loop turn)."""
        self._corked = []

    def uncork(self) -> None:
        """Write the held messages with one call, so the socket wakes QEMU once."""
        held, self._corked = self._corked, None
        if held and self._writer is not None:
            self._writer.write(b"".join(held))

    def _do_send(self, msg: Message) -> None:
        if self._corked is None:
            super()._do_send(msg)
            return
        if not self._corked:
            # The writer task sends everything queued in one step; write it after that step.
            asyncio.get_running_loop().call_soon(self.uncork)
        self._corked.append(bytes(msg))

    def _cb_outbound(self, msg: Message) -> Message:
        # The base class only logs, and renders the message to text even when the log
        # level drops it: tens of microseconds per message.
        if self.logger.isEnabledFor(logging.DEBUG):
            msg = super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            msg = super()._cb_inbound(msg)
        if "event" in msg:
            self.arrived.append((self.replies, msg))
            self._arrival.set()
        elif "return" in msg or "error" in msg:
            self.replies += 1
        return msg

    async def arrival(self) -> None:
        """Return once an event is waiting or the session has ended (bound it by a timeout)."""
        while not self.arrived and self.runstate == Runstate.RUNNING:
            self._arrival.clear()
            # Wake on an event at once; every 10 ms look for a hang-up (no event for that).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), 0.01)


class Connection:
    """A negotiated QMP session whose events are kept in arrival order until taken."""

    def __init__(self, path: Path, name: str) -> None:
        """Prepare a client for the socket at ``path`` (not connected yet)."""
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._client = _Client(name)
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        """Run ``coro`` on the private loop, bounded by ``timeout`` seconds."""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError as exc:
            raise QmpTimeout(f"no answer from QMP at {self.path} within {timeout:.1f}s") from exc

    def connect(self, timeout: float) -> None:
        """Connect, read the greeting and negotiate capabilities."""
        try:
            self._run(self._client.connect(str(self.path)), timeout)
        except QMPError as exc:
            raise QmpGone(f"cannot connect to QMP at {self.path}: {exc}") from exc

    @property
    def connected(self) -> bool:
        """Whether the session is up (pumps the loop once so a hang-up is noticed)."""
        if self._closed:
            return False
        self._run(asyncio.sleep(0), None)
        return self._client.runstate == Runstate.RUNNING

    def command(self, name: str, arguments: Mapping[str, object], timeout: float) -> Any:
        """Execute one command; its return value, or QmpRefused / QmpGone / QmpTimeout."""
        if self._closed or self._client.runstate != Runstate.RUNNING:
            raise QmpGone(f"QMP at {self.path} is closed")
        try:
            return self._run(self._client.execute(name, dict(arguments) or None), timeout)
        except ExecuteError as exc:
            raise QmpRefused(exc.error_class, exc.error.error.desc) from exc
        except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
            raise QmpGone(f"QMP at {self.path} closed during {name}") from exc

    @property
    def replies(self) -> int:
        """How many replies this session has read (a position in QEMU's output)."""
        return self._client.replies

    def batch(
        self, commands: Sequence[tuple[str, Mapping[str, object]]], timeout: float
    ) -> list[Any]:
        """Send ``commands`` together, QEMU runs them in order; each one's return or QmpRefused.

        One round trip instead of one per command.  QmpGone or QmpTimeout if the session
        ends or QEMU stops answering; the k-th reply of the batch is
        :attr:`replies` before the batch plus k.
        """
        if self._closed or self._client.runstate != Runstate.RUNNING:
            raise QmpGone(f"QMP at {self.path} is closed")
        client = self._client

        async def send() -> list[Any]:
            client.cork()
            try:
                return await asyncio.gather(
                    *(
                        client.execute(name, dict(arguments) or None)
                        for name, arguments in commands
                    ),
                    return_exceptions=True,
                )
            finally:
                client.uncork()

        results: list[Any] = self._run(send(), timeout)
        answers: list[Any] = []
        for (name, _), result in zip(commands, results, strict=True):
            if isinstance(result, ExecuteError):
                answers.append(QmpRefused(result.error_class, result.error.error.desc))
            elif isinstance(result, ExecInterruptedError | QMPError | EOFError | OSError):
                raise QmpGone(f"QMP at {self.path} closed during {name}") from result
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(result)
        return answers

    def take_events(
        self, before: int | None = None, *, pump: bool = True
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events read and not taken yet, oldest first, as (name, data).

        With ``before``, only those QEMU wrote before its reply number ``before + 1``
        (see :attr:`replies`).  ``pump=False`` skips the turn of the loop that reads
        what arrived since it last ran (right after a command, nothing has).
        """
        if pump and not self._closed:
            self._run(asyncio.sleep(0), None)
        arrived = self._client.arrived
        taken = []
        while arrived and (before is None or arrived[0][0] <= before):
            message = arrived.popleft()[1]
            taken.append(
                (str(message["event"]), dict(cast("Mapping[str, Any]", message.get("data", {}))))
            )
        return taken

    def wait_event(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for an event to arrive; False on timeout or hang-up."""
        if self._closed or self._client.runstate != Runstate.RUNNING or self._client.arrived:
            return bool(self._client.arrived)
        with contextlib.suppress(QmpTimeout):
            self._run(self._client.arrival(), timeout)
        return bool(self._client.arrived)

    def close(self) -> None:
        """Disconnect (whatever state the session is in) and close the private loop."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()
