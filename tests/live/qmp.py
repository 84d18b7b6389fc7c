"""The harness's QMP client: cprfsm.qmp's connection (qemu.qmp) behind the harness's API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cprfsm.qmp._connection import Connection, QmpGone, QmpRefused, QmpTimeout

if TYPE_CHECKING:
    from pathlib import Path

JSON = dict[str, Any]
EventPredicate = Callable[[JSON], bool]


class QMPError(Exception):
    """A QMP command answered with an error object."""

    def __init__(self, cls: str, desc: str) -> None:
        """Keep QEMU's error class and its human-readable description."""
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMPTimeoutError(TimeoutError):
    """QEMU did not answer or emit the awaited event in time."""


class QMPClient:
    """Talk QMP to one QEMU: commands in order, events collected as they arrive.

    A closed socket (QEMU died) raises ConnectionError.
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        """Remember the socket path and the default per-call timeout.

        `pending` names the command sent but not answered yet (useful when QEMU dies).
        """
        self.path = path
        self.timeout = timeout
        self.events: list[JSON] = []
        self._connection: Connection | None = None
        self._consumed = 0
        self.pending: str | None = None

    def connect(self, timeout: float | None = None) -> None:
        """Connect (retrying until QEMU listens), read the greeting, negotiate."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            connection = Connection(self.path, self.path.stem)
            try:
                connection.connect(max(deadline - time.monotonic(), 0.01))
            except (QmpGone, QmpTimeout):
                connection.close()
                if time.monotonic() > deadline:
                    raise QMPTimeoutError(f"no QMP server at {self.path}") from None
                time.sleep(0.01)
            else:
                self._connection = connection
                return

    def close(self) -> None:
        """Close the socket (QEMU keeps running)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def execute(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one command; return its result or raise QMPError with QEMU's class and text."""
        connection = self._live()
        self.pending = cmd
        try:
            result = connection.command(cmd, args, self.timeout if timeout is None else timeout)
        except QmpRefused as exc:
            self.pending = None
            raise QMPError(exc.error_class, exc.desc) from None
        except QmpGone as exc:
            raise ConnectionError(f"QEMU closed the QMP socket {self.path}") from exc
        except QmpTimeout as exc:
            raise QMPTimeoutError(f"QMP timed out on {self.path}") from exc
        finally:
            self._collect()
        self.pending = None
        return result

    def wait_event(
        self,
        name: str,
        pred: EventPredicate | None = None,
        timeout: float | None = None,
    ) -> JSON:
        """Return the first not-yet-awaited event called `name` that satisfies `pred`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        connection = self._live()
        while True:
            self._collect()
            for index in range(self._consumed, len(self.events)):
                event = self.events[index]
                if event["event"] == name and (pred is None or pred(event)):
                    self._consumed = index + 1
                    return event
            remaining = deadline - time.monotonic()
            if not connection.connected:
                raise ConnectionError(f"QEMU closed the QMP socket {self.path}")
            if remaining <= 0:
                raise QMPTimeoutError(f"QMP timed out on {self.path}")
            connection.wait_event(min(remaining, 0.1))

    def event_names(self) -> list[str]:
        """Collected events as short labels, e.g. `MIGRATION setup`, `STOP`."""
        labels = []
        for event in self.events:
            data = event.get("data", {})
            if event["event"] == "MIGRATION":
                labels.append(f"MIGRATION {data['status']}")
            elif event["event"] == "MIGRATION_PASS":
                labels.append(f"MIGRATION_PASS {data['pass']}")
            else:
                labels.append(str(event["event"]))
        return labels

    def _live(self) -> Connection:
        if self._connection is None:
            raise RuntimeError("QMP client is not connected")
        return self._connection

    def _collect(self) -> None:
        """Move the events read so far into `events`, in arrival order."""
        if self._connection is not None:
            self.events.extend(
                {"event": name, "data": data} for name, data in self._connection.take_events()
            )
