"""A small synchronous QMP client over a unix socket (stdlib only)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    """Talk QMP to one QEMU: commands in order, events collected as they arrive."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        """Remember the socket path and the default per-call timeout.

        `pending` names the command sent but not answered yet (useful when QEMU dies).
        """
        self.path = path
        self.timeout = timeout
        self.events: list[JSON] = []
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self._consumed = 0
        self.pending: str | None = None

    def connect(self, timeout: float | None = None) -> None:
        """Connect (retrying until QEMU listens), read the greeting, negotiate."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPTimeoutError(f"no QMP server at {self.path}") from None
                time.sleep(0.01)
        self._sock = sock
        self._read_message(deadline)  # the greeting
        self.execute("qmp_capabilities")

    def close(self) -> None:
        """Close the socket (QEMU keeps running)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def execute(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one command; return its result or raise QMPError with QEMU's class and text."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._next_id += 1
        msg_id = self._next_id
        request: JSON = {"execute": cmd, "id": msg_id}
        if args:
            request["arguments"] = args
        self.pending = cmd
        self._socket().sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != msg_id:
                continue
            self.pending = None
            if "error" in reply:
                err = reply["error"]
                raise QMPError(str(err["class"]), str(err["desc"]))
            return reply["return"]

    def wait_event(
        self,
        name: str,
        pred: EventPredicate | None = None,
        timeout: float | None = None,
    ) -> JSON:
        """Return the first not-yet-awaited event called `name` that satisfies `pred`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for index in range(self._consumed, len(self.events)):
                event = self.events[index]
                if event["event"] == name and (pred is None or pred(event)):
                    self._consumed = index + 1
                    return event
            self._read_message(deadline)

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

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError("QMP client is not connected")
        return self._sock

    def _read_message(self, deadline: float) -> JSON:
        """Read one JSON line; events are stored on the way, replies returned."""
        sock = self._socket()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeoutError(f"QMP timed out on {self.path}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise QMPTimeoutError(f"QMP timed out on {self.path}") from None
            if not chunk:
                raise ConnectionError(f"QEMU closed the QMP socket {self.path}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: JSON = json.loads(line)
        if "event" in message:
            self.events.append(message)
        return message
