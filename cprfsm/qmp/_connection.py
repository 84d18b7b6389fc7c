"""One QMP session over a unix socket, driven synchronously from a private event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping
    from pathlib import Path


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


class Connection:
    """A negotiated QMP session whose events are kept in arrival order until taken."""

    def __init__(self, path: Path, name: str) -> None:
        """Prepare a client for the socket at ``path`` (not connected yet)."""
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
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

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every event read so far and not taken yet, oldest first, as (name, data)."""
        if not self._closed:
            self._run(asyncio.sleep(0), None)
        return [
            (str(message["event"]), dict(cast("Mapping[str, Any]", message.get("data", {}))))
            for message in self._client.events.clear()
        ]

    def wait_event(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for an event to arrive; False on timeout or hang-up."""
        if self._closed or self._client.runstate != Runstate.RUNNING:
            return not self._client.events.empty()
        if not self._client.events.empty():
            return True

        async def arrival() -> None:
            listener = self._client.events
            # The listener offers no arrival signal that leaves the event queued.
            while listener.empty() and self._client.runstate == Runstate.RUNNING:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        with contextlib.suppress(QmpTimeout):
            self._run(arrival(), timeout)
        return not self._client.events.empty()

    def close(self) -> None:
        """Disconnect (whatever state the session is in) and close the private loop."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()
