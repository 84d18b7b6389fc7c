"""The QMP executor: carries out the machine's commands on a real QEMU process.

It speaks QMP through the official ``qemu.qmp`` library.  Its asyncio
``QMPClient`` is driven from a private event loop, one per connection, rather
than through the library's legacy synchronous wrapper: the wrapper installs
its loop as the thread's current loop and hides the session state, while the
executor needs to notice a closed socket (QEMU exited) between commands
without disturbing any loop its caller uses.  The consequence: call it from a
thread that is not running an asyncio loop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import weakref
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from cprfsm._files import open_regular, preallocate, refuse_special
from cprfsm.exceptions import ExecutorError, UnsafePathError
from cprfsm.executor import Command, Exited, QmpEvent, Report, VmDefinition
from cprfsm.legality import MemoryBackend
from cprfsm.qmp._argv import (
    DEFAULT_ACCEL,
    command_line,
    default_qemu,
    default_qemu_img,
    disk_images,
    ram_file,
)
from cprfsm.qmp._connection import Connection, QmpGone, QmpRefused, QmpTimeout
from cprfsm.qmp._guest import (
    MARKER_ADDRESS,
    MARKER_LENGTH,
    MARKER_MAGIC,
    Guest,
    write_boot_image,
)
from cprfsm.qmp._process import exited, kill_group, last_words, spawn
from cprfsm.simulator import on_volatile_filesystem

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from cprfsm.executor import Fact

__all__ = ["QmpExecutor", "read_marker"]

#: query-migrate statuses a migration can stay in; any other is still moving.
SETTLED_STATUSES = frozenset(
    {"none", "completed", "failed", "cancelled", "pre-switchover", "colo", "postcopy-paused"}
)
_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Statuses a migration rests in; only a new migrate or migrate-incoming moves it on.
_AT_REST = frozenset({"none", *_TERMINAL})
#: Commands QEMU completes before it replies (their events precede the reply): the fence,
#: the command and the settle queries go out together, one round trip in all.
_SYNCHRONOUS = frozenset({"stop", "cont", "migrate-set-parameters", "migrate-set-capabilities"})
_POLL = 0.01
#: How often a starting QEMU's socket is looked for (a stat call, no QMP traffic).
_SOCKET_POLL = 0.001
_SOCKET_LIMIT = 107  # sun_path holds 108 bytes with the terminating NUL


class _Resources:
    """What must be released even if the executor is never closed (weakref.finalize target)."""

    def __init__(self, workdir: Path | None) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None
        self.own_workdir = workdir

    def drop_connection(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def release(self) -> None:
        self.drop_connection()
        if self.process is not None:
            kill_group(self.process)
            self.process = None
        if self.own_workdir is not None:
            shutil.rmtree(self.own_workdir, ignore_errors=True)
            self.own_workdir = None


class QmpExecutor:
    """Carries out :class:`~cprfsm.executor.Command` on a real QEMU and reports what it said.

    An executor made by the constructor owns its QEMU: ``start`` launches it
    (see :func:`command_line`) in its own session with a parent-death signal,
    and ``close`` kills it.  One made by :meth:`attach` drives a QEMU someone
    else started and never kills it.  Timeouts are in seconds: ``settle_timeout``
    bounds every wait for QEMU to settle, ``command_timeout`` every QMP reply,
    ``event_wait`` the short wait for an event a settled QEMU still owes.
    """

    def __init__(  # noqa: PLR0913 - each option is independent and keyword-only
        self,
        workdir: Path | None = None,
        *,
        qemu: str | None = None,
        qemu_img: str | None = None,
        accel: str = DEFAULT_ACCEL,
        guest: Guest = Guest.LOOP,
        settle_timeout: float = 20.0,
        command_timeout: float = 10.0,
        event_wait: float = 2.0,
        volatile: Callable[[str], bool] | None = None,
    ) -> None:
        """Prepare an executor whose files (sockets, images, RAM files) live in ``workdir``.

        Without ``workdir`` a fresh temporary directory is made and removed on close.
        Keep the path short: it holds unix sockets.
        """
        own = None
        if workdir is None:
            own = workdir = Path(tempfile.mkdtemp(prefix="cprfsm-qmp-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.qemu = qemu or default_qemu()
        self.qemu_img = qemu_img or default_qemu_img()
        self.accel = accel
        self.guest = guest
        self.settle_timeout = settle_timeout
        self.command_timeout = command_timeout
        self.event_wait = event_wait
        self._volatile = volatile or on_volatile_filesystem
        self._resources = _Resources(own)
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._attached: Path | None = None
        self._unasked: list[QmpEvent] = []
        # Runstate and query-migrate a handler already read after its command settled.
        self._settled: tuple[str, dict[str, Any]] | None = None
        # The last query-migrate answer this executor read (None: none yet, or a new QEMU).
        self._known_migration: dict[str, Any] | None = None
        self._exit_reported = True
        self._closed = False
        self._starts = 0
        self._dumps = 0
        self._log = workdir / "qemu.log"
        self._state_files: dict[Path, str] = {}
        self._ram_files: set[Path] = set()
        #: The argv of the QEMU this executor started last (empty before the first start).
        self.argv: list[str] = []

    @classmethod
    def attach(
        cls,
        socket_path: Path,
        *,
        workdir: Path | None = None,
        settle_timeout: float = 20.0,
        command_timeout: float = 10.0,
        event_wait: float = 2.0,
    ) -> QmpExecutor:
        """Drive the QEMU listening on the QMP socket ``socket_path``, which someone else owns.

        ``start`` and ``reboot-host`` raise :class:`ExecutorError`; ``quit`` is sent
        and waits for the socket to close; ``close`` only disconnects.  When the
        socket closes the executor reports ``Exited(code=None)``: only the owner
        of the process can know its exit status.
        """
        executor = cls(
            workdir,
            settle_timeout=settle_timeout,
            command_timeout=command_timeout,
            event_wait=event_wait,
        )
        executor._attached = socket_path
        executor._connect(socket_path, lambda: False)
        return executor

    # -- the Executor protocol -------------------------------------------------------------

    def execute(self, command: Command) -> Report:
        """Carry out ``command``, wait (bounded) until QEMU settles, report what happened."""
        handler = self._handlers().get(command.name)
        if handler is None:
            raise ExecutorError(f"the QMP executor has no command {command.name!r}")
        if self._closed:
            raise ExecutorError("the QMP executor is closed")
        if command.name not in {"start", "reboot-host"}:
            self._require_session(command.name)
            if command.name not in _SYNCHRONOUS:
                self._fence()  # the synchronous commands send their fence with the command
        self._settled = None
        facts: list[Fact] = []
        extra: dict[str, Any] = {}
        try:
            extra = handler(command.arguments, facts) or {}
        except QmpRefused as exc:
            return self._report(facts, refused=exc.desc)
        except QmpGone:
            pass  # the exit is among the facts _report collects
        except QmpTimeout as exc:
            raise ExecutorError(str(exc), waiting_for=f"QEMU's reply to {command.name}") from exc
        return self._report(facts, **extra)

    def observe(self, timeout: float) -> Report:
        """Events QEMU emitted unasked (and its exit), waiting up to ``timeout`` for one."""
        facts: list[Fact] = list(self._unasked)
        self._unasked.clear()
        connection = self._resources.connection
        if connection is not None:
            facts.extend(self._take(connection))
            if not facts and not self._gone() and connection.wait_event(timeout):
                facts.extend(self._take(connection))
        return self._report(facts)

    def volatile(self, path: str) -> bool:
        """Whether ``path`` is on storage a host reboot wipes (tmpfs or ramfs by default)."""
        return self._volatile(path)

    def close(self) -> None:
        """Kill the owned QEMU (its whole session) and reap it, or just disconnect; idempotent."""
        self._closed = True
        if self._attached is not None:
            self._resources.drop_connection()
        self._finalizer()

    def __enter__(self) -> Self:
        """The executor itself; it is closed on leaving the block."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the executor whatever happened."""
        self.close()

    # -- extras ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of the owned QEMU process, None when there is none (or attached)."""
        process = self._resources.process
        return None if process is None else process.pid

    @property
    def socket_path(self) -> Path | None:
        """The QMP socket of the current session, None without one."""
        connection = self._resources.connection
        return None if connection is None else connection.path

    def read_guest_ram(self, address: int, length: int) -> bytes:
        """``length`` bytes of guest-physical RAM at ``address`` (QMP ``pmemsave`` via a file)."""
        connection = self._require_session("pmemsave")
        self._dumps += 1
        dump = self.workdir / f"pmem{self._dumps}.bin"
        arguments = {"val": address, "size": length, "filename": str(dump)}
        try:
            connection.command("pmemsave", arguments, self.command_timeout)
            return dump.read_bytes()
        except (QmpRefused, QmpGone, QmpTimeout) as exc:
            raise ExecutorError(f"pmemsave failed: {exc}", waiting_for="pmemsave") from exc
        finally:
            self._unasked.extend(self._take(connection))
            dump.unlink(missing_ok=True)

    def query(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """QEMU's answer to one ``query-*`` command (a read: it changes nothing in QEMU).

        Events arriving meanwhile are kept for :meth:`observe`.  A refusal, a
        closed socket or a timeout raise :class:`ExecutorError`.
        """
        if not command.startswith("query-"):
            raise ExecutorError(
                f"query() sends only query-* commands, not {command!r}: "
                "commands that act go through execute()"
            )
        connection = self._require_session(command)
        try:
            return connection.command(command, arguments or {}, self.command_timeout)
        except QmpRefused as exc:
            raise ExecutorError(f"QEMU refused {command}: {exc.desc}") from exc
        except (QmpGone, QmpTimeout) as exc:
            raise ExecutorError(f"{command} failed: {exc}", waiting_for=command) from exc
        finally:
            self._unasked.extend(self._take(connection))

    # -- sessions and processes ------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[Mapping[str, Any], list[Fact]], Any]]:
        return {
            "start": self._start,
            "quit": self._quit,
            "reboot-host": self._reboot_host,
            "guest-suspend": lambda _, facts: self._guest_event("SUSPEND", facts),
            "guest-reset": lambda _, facts: self._guest_event("RESET", facts),
            "guest-shutdown": self._guest_shutdown,
            "stop": lambda _, facts: self._synchronous("stop", {}, facts),
            "cont": lambda _, facts: self._synchronous("cont", {}, facts),
            "system_wakeup": self._wakeup,
            "migrate-set-parameters": self._set_parameters,
            "migrate-set-capabilities": self._set_capabilities,
            "migrate": self._migrate,
            "migrate-continue": self._continue,
            "migrate_cancel": self._cancel,
            "migrate-incoming": self._incoming,
        }

    def _require_session(self, what: str) -> Connection:
        connection = self._resources.connection
        if connection is None or self._gone():
            raise ExecutorError(
                f"cannot {what}: no QEMU is running (observe() reports an exit not yet seen)",
                waiting_for="a running QEMU",
            )
        return connection

    def _gone(self) -> bool:
        """Whether the QEMU of the current session has ended (or closed its socket)."""
        process = self._resources.process
        if process is not None and process.poll() is not None:
            return True
        connection = self._resources.connection
        return connection is not None and not connection.connected

    def _take(
        self, connection: Connection, before: int | None = None, *, pump: bool = True
    ) -> list[QmpEvent]:
        return [
            QmpEvent(name=name, data=data)
            for name, data in connection.take_events(before, pump=pump)
        ]

    def _fence(self) -> None:
        """Read everything QEMU emitted before now into the unasked events."""
        connection = self._resources.connection
        if connection is not None:
            with suppress(QmpGone, QmpTimeout):
                connection.command("query-status", {}, self.command_timeout)
            self._unasked.extend(self._take(connection))

    def _connect(self, socket_path: Path, died: Callable[[], bool]) -> Connection:
        """Connect once ``socket_path`` listens; give up when ``died()`` or on timeout."""
        deadline = time.monotonic() + self.settle_timeout
        while True:
            if died():
                raise QmpGone("QEMU exited before its QMP socket listened")
            if socket_path.exists():
                connection = Connection(socket_path, socket_path.stem)
                try:
                    connection.connect(self.command_timeout)
                except (QmpGone, QmpTimeout):
                    connection.close()
                else:
                    self._resources.connection = connection
                    self._exit_reported = False
                    return connection
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"QEMU's QMP socket {socket_path} did not answer in {self.settle_timeout}s",
                    waiting_for="the QMP socket",
                )
            time.sleep(_SOCKET_POLL)

    def _exit_fact(self) -> Exited:
        """End the session: the owned process's exit, or an attached QEMU's closed socket."""
        self._resources.drop_connection()
        process = self._resources.process
        if process is None:
            return Exited(message="the QMP socket closed")
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=self.settle_timeout)
        kill_group(process)  # what it left behind (exec: children), or itself if it hung
        returncode = process.wait()
        self._resources.process = None
        return exited(returncode, last_words(self._log, self.qemu))

    def _report(self, facts: list[Fact], **fields: Any) -> Report:
        """Finish a report: remaining events, the exit if QEMU ended, runstate and migration."""
        connection = self._resources.connection
        runstate: str | None = None
        info: dict[str, Any] = {}
        settled, self._settled = self._settled, None
        if settled is not None:
            # The handler's last replies just came: the session was up, nothing more is read.
            runstate, info = settled
            self._known_migration = info
            if connection is not None:
                facts.extend(self._take(connection, pump=False))
            return Report(
                facts=tuple(facts),
                runstate=runstate,
                status=str(info.get("status", "none")),
                error=str(info.get("error-desc", "")),
                **fields,
            )
        if connection is not None and not self._gone():
            try:
                runstate = str(
                    connection.command("query-status", {}, self.command_timeout)["status"]
                )
                info = dict(connection.command("query-migrate", {}, self.command_timeout))
                self._known_migration = info
            except QmpGone:
                runstate, info = None, {}
            except QmpTimeout as exc:
                raise ExecutorError(str(exc), waiting_for="query-status") from exc
        if connection is not None:
            facts.extend(self._take(connection))
        if not self._exit_reported and (connection is None or self._gone()):
            facts.append(self._exit_fact())
            self._exit_reported = True
            runstate, info = None, {}
        return Report(
            facts=tuple(facts),
            runstate=runstate,
            status=str(info.get("status", "none")),
            error=str(info.get("error-desc", "")),
            **fields,
        )

    # -- commands --------------------------------------------------------------------------

    def _command(self, name: str, arguments: Mapping[str, Any], facts: list[Fact]) -> Any:
        connection = self._resources.connection
        if connection is None or self._gone():
            raise QmpGone(f"QEMU ended before {name}")
        try:
            return connection.command(name, arguments, self.command_timeout)
        finally:
            facts.extend(self._take(connection))

    def _synchronous(self, name: str, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        """The command and its queries, sent together; QEMU runs them in order.

        What was read before sending is unasked; every event read after it is the
        command's (an event QEMU wrote just before taking the command counts too, so
        the machine sees it and records a divergence rather than losing it).
        ``query-migrate`` is left out where its answer cannot have changed: this
        executor owns QEMU (no other client can start a migration) and the last
        answer was at rest (none, completed, failed, cancelled) with no MIGRATION
        event since.  QmpRefused if QEMU refused the command.
        """
        connection = self._resources.connection
        if connection is None:
            raise QmpGone(f"QEMU ended before {name}")
        self._unasked.extend(self._take(connection, pump=False))
        known = self._known_migration
        reuse = (
            self._attached is None
            and known is not None
            and str(known.get("status", "none")) in _AT_REST
        )
        queries: list[tuple[str, Mapping[str, Any]]] = [(name, arguments), ("query-status", {})]
        if not reuse:
            queries.append(("query-migrate", {}))
        try:
            replies = connection.batch(queries, self.command_timeout)
        finally:
            facts.extend(self._take(connection, pump=False))
        answer, status = replies[0], replies[1]
        info = replies[2] if not reuse else known
        if reuse and any(isinstance(f, QmpEvent) and f.name == "MIGRATION" for f in facts):
            info = connection.command("query-migrate", {}, self.command_timeout)
        for query in (status, info):
            if isinstance(query, QmpRefused):
                raise QmpGone(f"QEMU refused a query after {name}: {query.desc}")
        assert info is not None  # reuse implies a known answer
        self._settled = (str(status["status"]), dict(info))
        if isinstance(answer, QmpRefused):
            raise answer

    def _start(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        if self._attached is not None:
            raise ExecutorError(
                f"an attached executor cannot start QEMU: it drives {self._attached}"
            )
        if self._resources.process is not None and self._resources.process.poll() is None:
            raise ExecutorError("this executor's QEMU is still running: quit it first")
        if not self._exit_reported:
            facts.append(self._exit_fact())  # an earlier QEMU's end that nobody asked about
        self._resources.drop_connection()
        self._resources.process = None
        self._known_migration = None
        definition = arguments.get("definition", VmDefinition())
        guest = Guest(arguments.get("guest", self.guest))
        self._starts += 1
        socket_path = self.workdir / f"qmp{self._starts}.sock"
        if len(str(socket_path)) > _SOCKET_LIMIT:
            raise ExecutorError(f"work directory {self.workdir} is too long for a unix socket")
        socket_path.unlink(missing_ok=True)
        boot = write_boot_image(guest, self.workdir / f"boot-{guest.value}.img")
        for fmt, _, image in disk_images(definition, self.workdir):
            _refuse_special(image, f"the {fmt} image")
            if not image.exists():
                self._create_image(fmt, image)
        self.argv = command_line(
            definition,
            workdir=self.workdir,
            qmp_socket=socket_path,
            boot_image=boot,
            paused=bool(arguments.get("paused", False)),
            incoming=bool(arguments.get("incoming", False)),
            qemu=self.qemu,
            accel=self.accel,
        )
        ram = ram_file(definition, self.workdir)
        if ram is not None:
            _prepare_ram_file(ram, definition)
            self._ram_files.add(ram)
        self._log.write_bytes(b"")
        try:
            process = spawn(self.argv, self._log)
        except OSError as exc:
            raise ExecutorError(f"cannot run {self.qemu}: {exc}") from exc
        self._resources.process = process
        try:
            self._connect(socket_path, lambda: process.poll() is not None)
        except QmpGone as exc:
            process.wait()
            self._resources.process = None
            stderr = self._log.read_text(encoding="utf-8", errors="replace").strip()
            raise ExecutorError(
                f"QEMU exited with status {process.returncode} before QMP answered:\n{stderr}",
                waiting_for="the QMP socket",
            ) from exc

    def _create_image(self, fmt: str, image: Path) -> None:
        try:
            subprocess.run(  # noqa: S603 - fixed argv of paths this executor chose
                [self.qemu_img, "create", "-q", "-f", fmt, str(image), "1M"],
                check=True,
                capture_output=True,
                timeout=self.command_timeout,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ExecutorError(f"cannot create the {fmt} image {image}: {exc}") from exc

    def _quit(self, _: Mapping[str, Any], facts: list[Fact]) -> None:
        with suppress(QmpGone):
            self._command("quit", {}, facts)
        self._wait_event("SHUTDOWN", facts, self.settle_timeout, strict=False)
        self._wait_gone(facts, "QEMU to exit after quit")

    def _guest_shutdown(self, _: Mapping[str, Any], facts: list[Fact]) -> None:
        self._guest_event("SHUTDOWN", facts)
        self._wait_gone(facts, "QEMU to exit after the guest shut down")

    def _reboot_host(self, _: Mapping[str, Any], facts: list[Fact]) -> dict[str, Any]:
        """Simulate a host reboot's effect on this VM's artefacts: QEMU dies, tmpfs files go."""
        if self._attached is not None:
            raise ExecutorError(
                "an attached executor does not own QEMU and cannot reboot its host"
            )
        process = self._resources.process
        if process is not None:
            connection = self._resources.connection
            if connection is not None:
                facts.extend(self._take(connection))
            kill_group(process)
        lost = []
        for path in sorted(self._ram_files):
            if self.volatile(str(path)) and path.exists():
                path.unlink()
                lost.append(str(path))
        for path, uri in sorted(self._state_files.items()):
            if self.volatile(str(path)) and path.exists():
                path.unlink()
                lost.append(uri)
        self._ram_files.difference_update(Path(path) for path in lost)
        self._state_files = {p: u for p, u in self._state_files.items() if u not in lost}
        return {"lost": tuple(sorted(lost))}

    def _wakeup(self, _: Mapping[str, Any], facts: list[Fact]) -> None:
        self._command("system_wakeup", {}, facts)
        self._wait_event("WAKEUP", facts, self.settle_timeout)

    def _guest_event(self, name: str, facts: list[Fact]) -> None:
        """Wait for the guest to act by itself; an event already read but not reported counts."""
        for index, event in enumerate(self._unasked):
            if event.name == name:
                facts.extend(self._unasked[: index + 1])
                del self._unasked[: index + 1]
                return
        self._wait_event(name, facts, self.settle_timeout)

    def _set_parameters(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        self._synchronous("migrate-set-parameters", arguments, facts)

    def _set_capabilities(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        capabilities: Mapping[str, bool] = arguments.get("capabilities", {})
        listed = [{"capability": name, "state": bool(on)} for name, on in capabilities.items()]
        self._synchronous("migrate-set-capabilities", {"capabilities": listed}, facts)

    def _remember_state_file(self, arguments: Mapping[str, Any]) -> None:
        uri = str(arguments.get("uri", ""))
        if uri.startswith("file:"):
            path = Path(uri.removeprefix("file:").split(",")[0])
            # QEMU would write through a symlink, replace a device's data or wait on a FIFO.
            _refuse_special(path, "the state file")
            self._state_files[path] = uri

    def _migrate(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        self._remember_state_file(arguments)
        qmp = {key: value for key, value in arguments.items() if key != "rests_in"}
        self._command("migrate", qmp, facts)
        self._settle_outgoing(facts, arguments.get("rests_in"))

    def _continue(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        qmp = {key: value for key, value in arguments.items() if key != "rests_in"}
        self._command("migrate-continue", {"state": "pre-switchover", **qmp}, facts)
        self._poll(
            lambda: True if self._migration(facts).get("status") != "pre-switchover" else None,
            "the migration to leave pre-switchover",
        )
        self._settle_outgoing(facts, arguments.get("rests_in"))

    def _cancel(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        qmp = {key: value for key, value in arguments.items() if key != "rests_in"}
        self._command("migrate_cancel", qmp, facts)
        self._settle_outgoing(facts, arguments.get("rests_in"))

    def _incoming(self, arguments: Mapping[str, Any], facts: list[Fact]) -> None:
        self._remember_state_file(arguments)
        rests_in = arguments.get("rests_in")
        qmp = {key: value for key, value in arguments.items() if key != "rests_in"}
        self._command("migrate-incoming", qmp, facts)
        held: list[float] = []

        def ended() -> str | None:
            status = str(self._migration(facts).get("status", "none"))
            if status == "completed" and self._runstate(facts) != "inmigrate":
                return status
            if status == rests_in:  # e.g. a channel that never opened: QEMU stays in setup
                held.append(time.monotonic())
                return status if held[-1] - held[0] >= self.event_wait else None
            return "failed" if status == "failed" else None

        status = self._poll(ended, "the incoming migration to complete or fail")
        if status is None:
            return
        self._await_migration_event(status, facts)
        if status == "failed":  # QEMU exits on a failed load unless told otherwise
            self._wait_gone(facts, "QEMU to exit after the failed load", strict=False)

    # -- settling --------------------------------------------------------------------------

    def _migration(self, facts: list[Fact]) -> dict[str, Any]:
        return dict(self._command("query-migrate", {}, facts))

    def _runstate(self, facts: list[Fact]) -> str:
        return str(self._command("query-status", {}, facts)["status"])

    def _settle_outgoing(self, facts: list[Fact], rests_in: str | None = None) -> None:
        """Wait for a settled status (terminal: also out of finish-migrate, error text set).

        ``rests_in`` is a status the caller expects QEMU to wait in for good (a
        stalled migration): once QEMU has held it for ``event_wait`` it counts as settled.
        """
        held: list[float] = []

        def settled() -> str | None:
            info = self._migration(facts)
            status = str(info.get("status", "none"))
            if status == rests_in:
                held.append(time.monotonic())
                return status if held[-1] - held[0] >= self.event_wait else None
            held.clear()
            if status not in SETTLED_STATUSES:
                return None
            if status in _TERMINAL and (
                self._runstate(facts) == "finish-migrate"
                or (status == "failed" and "error-desc" not in info)
            ):
                return None
            return status

        status = self._poll(settled, "query-migrate to report a settled status")
        if status is not None:
            self._await_migration_event(status, facts)

    def _await_migration_event(self, status: str, facts: list[Fact]) -> None:
        """With the ``events`` capability on, wait briefly for ``MIGRATION <status>``."""
        if status == "none":
            return
        capabilities = self._command("query-migrate-capabilities", {}, facts)
        if any(cap["capability"] == "events" and cap["state"] for cap in capabilities):
            self._wait_event(f"MIGRATION {status}", facts, self.event_wait, strict=False)

    def _poll(self, probe: Callable[[], Any], what: str) -> Any:
        """Call ``probe`` until it answers, again 10 ms later or at QEMU's next event.

        None if QEMU ends first.  The probes take the events they read, so an event
        that wakes the wait is one the last probe did not see.
        """
        deadline = time.monotonic() + self.settle_timeout
        while True:
            try:
                value = probe()
            except QmpGone:
                return None
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"QEMU did not settle within {self.settle_timeout}s: waiting for {what}",
                    waiting_for=what,
                )
            connection = self._resources.connection
            if connection is None:
                time.sleep(_POLL)
            else:
                connection.wait_event(_POLL)

    def _wait_event(
        self, label: str, facts: list[Fact], timeout: float, *, strict: bool = True
    ) -> bool:
        """Wait until an event labelled ``label`` is among ``facts``; False if QEMU ended first."""
        connection = self._resources.connection
        deadline = time.monotonic() + timeout
        while True:
            if connection is not None:
                facts.extend(self._take(connection))
            if any(isinstance(f, QmpEvent) and f.label == label for f in facts):
                return True
            remaining = deadline - time.monotonic()
            if connection is None or self._gone():
                return False
            if remaining <= 0:
                if strict:
                    raise ExecutorError(
                        f"QEMU did not emit {label} within {timeout}s", waiting_for=label
                    )
                return False
            connection.wait_event(min(remaining, 0.1))

    def _wait_gone(self, facts: list[Fact], what: str, *, strict: bool = True) -> None:
        """Wait until the process exits (or, attached, the socket closes)."""
        deadline = time.monotonic() + (self.settle_timeout if strict else self.event_wait)
        while not self._gone():
            if time.monotonic() > deadline:
                if strict:
                    raise ExecutorError(f"timed out waiting for {what}", waiting_for=what)
                return
            connection = self._resources.connection
            if connection is not None:
                facts.extend(self._take(connection))
            process = self._resources.process
            if process is None:
                time.sleep(_POLL)
            else:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_POLL)  # returns as soon as it exits


def _refuse_special(path: Path, what: str) -> None:
    """ExecutorError if ``path`` is a symlink, device, FIFO or socket: QEMU would use it."""
    try:
        refuse_special(path, what)
    except UnsafePathError as exc:
        raise ExecutorError(str(exc)) from None


def _prepare_ram_file(path: Path, definition: VmDefinition) -> None:
    """Create or check QEMU's RAM file; allocate a shared one so a full disk is not a SIGBUS."""
    backend = MemoryBackend.parse(definition.memory)
    try:
        fd, created = open_regular(path, "the guest RAM file")
    except UnsafePathError as exc:
        raise ExecutorError(str(exc)) from None
    except OSError as exc:
        raise ExecutorError(f"cannot open the guest RAM file {path}: {exc.strerror}") from exc
    try:
        if backend.share:
            preallocate(fd, definition.ram_size)
    except OSError as exc:
        if created:
            path.unlink(missing_ok=True)
        raise ExecutorError(
            f"cannot allocate {definition.ram_size} bytes for the guest RAM file {path}: "
            f"{exc.strerror}; free some space or give a smaller RAM size"
        ) from exc
    finally:
        os.close(fd)


def read_marker(executor: QmpExecutor, timeout: float = 10.0) -> bytes:
    """The boot marker the guest wrote into its RAM: magic then TSC (see :class:`Guest`).

    A guest that has not booted that far yet has no marker: wait up to ``timeout``
    for the magic to appear, then return what the RAM holds (zeros if it never did).
    """
    deadline = time.monotonic() + timeout
    while True:
        marker = executor.read_guest_ram(MARKER_ADDRESS, MARKER_LENGTH)
        if marker.startswith(MARKER_MAGIC) or time.monotonic() > deadline:
            return marker
        time.sleep(_POLL * 5)
