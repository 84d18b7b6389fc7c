"""``cprfsm demo``: a whole cpr-reboot cycle, on the simulator or a real QEMU, recorded.

Start a guest, let it write recognisable RAM, (suspend it), save it with
``migrate`` in mode cpr-reboot, quit QEMU, (reboot the host), start a new QEMU
with ``-incoming defer``, restore, (wake it up) — each step decided by the
model, performed for real by :class:`~cprfsm.simulator.Simulator` (backend
``sim``) or by a real QEMU 10.0 through :class:`~cprfsm.qmp.QmpExecutor`
(backend ``qemu``), and recorded in an SQLite store.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import attrs

from cprfsm import vm_events as ev
from cprfsm._qemu import SimulatedQemu
from cprfsm.exceptions import IllegalTransition, UsageError
from cprfsm.executor import ExecutorError
from cprfsm.legality import _device
from cprfsm.lifecycle import fold, initial_state
from cprfsm.machine import CommandFailed, QemuAbortPredicted, VirtualMachine
from cprfsm.ports import Ports, StreamHeader, StreamReader, StreamWriter, Transfer, VmDefinition
from cprfsm.simulator import Simulator
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from cprfsm.events import Event
    from cprfsm.executor import Executor
    from cprfsm.qmp import QmpExecutor

__all__ = [
    "BACKENDS",
    "DemoOptions",
    "DemoReport",
    "TimelineEntry",
    "default_progress",
    "parse_size",
    "qemu_backend_missing",
    "resolve_backend",
    "run_demo",
]

#: The ``--backend`` choices: ``auto`` is ``qemu`` where it can run the request, else ``sim``.
BACKENDS = ("sim", "qemu", "auto")
#: The QEMU release the qemu backend drives (its model and the tests' guest).
QEMU_RELEASE = "10.0"

_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_MARKER = b"cprfsm-demo-guest"
_QEMU_VERSION = re.compile(r"version (\d+)\.(\d+)\.(\d+)")
# Unix socket paths hold 107 bytes; keep room for the executor's qmpN.sock names.
_SOCKET_ROOM = 96
# How long the qemu backend waits at the end for events QEMU still owes (a RESET, a STOP).
_LATE_EVENTS = 0.2


def parse_size(text: str) -> int:
    """Parse a RAM size such as ``64M``, ``1G`` or ``512MiB`` into bytes."""
    match = _SIZE.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise UsageError(f"RAM size {text!r} is not a size such as 64M or 1G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


@attrs.frozen(kw_only=True)
class DemoOptions:
    """What ``cprfsm demo`` was asked to do."""

    store: Path
    ram: int = 64 * 2**20
    memory: str = "file,share=on"
    uri: str | None = None
    capabilities: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    suspend: bool = False
    reboot: bool = False
    strict: bool = False
    backend: str = "sim"


@attrs.frozen(kw_only=True)
class DemoReport:
    """What happened: the end state, timings, digests, hazards and the timeline."""

    vm: str
    store: str
    backend: str
    phase: str
    runstate: str | None
    outcome: str
    state_file_bytes: int
    save_seconds: float
    restore_seconds: float
    ram_digest_before: str
    ram_digest_after: str
    data_lost: bool
    hazards: tuple[str, ...]
    error: str | None
    timeline: tuple[TimelineEntry, ...]

    def to_json(self) -> dict[str, Any]:
        """The report as the JSON object ``cprfsm demo --json`` prints."""
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class TimelineEntry:
    """One recorded event, with the phase and runstate it left the VM in."""

    version: int
    event: str
    detail: str
    phase: str
    runstate: str | None


def qemu_backend_missing() -> str | None:
    """Why the qemu backend cannot run here (no QEMU 10.0, no ``qmp`` extra), or None."""
    binary = os.environ.get("CPRFSM_QEMU", "qemu-system-x86_64")
    if shutil.which(binary) is None:
        return f"{binary} is not on PATH (CPRFSM_QEMU names another binary)"
    try:
        done = subprocess.run(  # noqa: S603 - the QEMU binary the executor would start
            [binary, "--version"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{binary} --version failed: {exc}"
    match = _QEMU_VERSION.search(done.stdout)
    if match is None or f"{match.group(1)}.{match.group(2)}" != QEMU_RELEASE:
        found = match.group(0) if match else (done.stdout.strip() or "no version")
        return f"{binary} reports {found}, the qemu backend needs QEMU {QEMU_RELEASE}.x"
    if importlib.util.find_spec("qemu.qmp") is None:
        return "the qmp extra is not installed (pip install 'cprfsm[qmp]')"
    return None


def resolve_backend(backend: str, devices: tuple[str, ...] = ()) -> str:
    """The backend that runs: ``sim`` or ``qemu``; ``auto`` is qemu where it can run the request.

    QEMU on a host without VFIO hardware has no vfio device, so ``--device vfio``
    runs on the simulator only: ``auto`` picks ``sim`` for it and an explicit
    ``qemu`` is a usage error, as is ``qemu`` where :func:`qemu_backend_missing`.
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    vfio = [spec for index, spec in enumerate(devices) if _device(spec, index)[0] == "vfio"]
    if backend == "sim" or (backend == "auto" and vfio):
        return "sim"
    missing = qemu_backend_missing()
    if backend == "auto":
        return "sim" if missing else "qemu"
    if missing:
        raise UsageError(f"--backend qemu cannot run here: {missing}; use --backend sim")
    if vfio:
        raise UsageError(
            "--device vfio cannot run on the qemu backend: QEMU has no vfio device "
            "without VFIO hardware; use --backend sim, whose model fails it as QEMU does"
        )
    return "qemu"


def run_demo(
    options: DemoOptions,
    *,
    progress: TextIO | None = None,
    wrap_executor: Callable[[Executor], Executor] | None = None,
) -> DemoReport:
    """Run the cycle; ``progress`` (e.g. a terminal) gets a live line for simulated saves.

    ``wrap_executor`` wraps the executor the VM drives (to watch what QEMU reports).
    """
    backend = resolve_backend(options.backend, options.devices)
    path = options.store.resolve()
    with SQLiteStore(path) as store:
        vm_id = f"demo-{len(store.streams()) + 1}"
        workdir = path.parent / f"{path.stem}.d" / vm_id
        definition = VmDefinition(
            memory=_with_default_path(options.memory, workdir),
            ram_size=options.ram,
            devices=options.devices,
        )
        guest: _Guest = (
            _QemuGuest(workdir, suspend=options.suspend)
            if backend == "qemu"
            else _SimGuest(workdir, progress)
        )
        try:
            executor = guest.executor
            vm = VirtualMachine(
                vm_id,
                store=store,
                executor=wrap_executor(executor) if wrap_executor else executor,
                definition=definition,
                strict=options.strict,
            )
            uri = options.uri or f"file:{workdir / 'vm.state'}"
            run = _Run(vm=vm, store=store, guest=guest, options=options, uri=uri)
            run.cycle()
            if progress is not None and backend == "sim" and run.restore_seconds:
                progress.write("\n")
            return run.report(path=str(path))
        finally:
            guest.close()


class _Guest(Protocol):
    """What the cycle needs of a backend: its executor and a look at the guest's RAM."""

    backend: str
    #: Capabilities turned on with the user's (the qemu backend's ``events``).
    capabilities: tuple[str, ...]

    @property
    def executor(self) -> Executor: ...

    def booted(self) -> None: ...

    def digest(self) -> str: ...

    def state_file_bytes(self, vm: VirtualMachine, uri: str) -> int: ...

    def finish(self, vm: VirtualMachine) -> None: ...

    def close(self) -> None: ...


class _SimGuest:
    """The simulator: the demo writes the guest's RAM and digests all of it."""

    backend: str = "sim"
    capabilities: tuple[str, ...] = ()

    def __init__(self, workdir: Path, progress: TextIO | None) -> None:
        self._simulator = Simulator(workdir)
        ports = self._simulator.ports()
        self._executor = SimulatedQemu(
            _with_progress(ports, progress),
            volatile=ports.host.volatile,
            closing=self._simulator.close,
        )

    @property
    def executor(self) -> Executor:
        return self._executor

    def booted(self) -> None:
        self._simulator.guest_write(_MARKER, seed=1)

    def digest(self) -> str:
        return self._simulator.ram_digest()

    def state_file_bytes(self, vm: VirtualMachine, uri: str) -> int:
        written = vm.state.state_file(uri)
        return written.bytes_written if written else 0

    def finish(self, vm: VirtualMachine) -> None:
        pass

    def close(self) -> None:
        self._simulator.close()


class _QemuGuest:
    """A real QEMU booting the QMP executor's guest; its RAM "digest" is the boot marker."""

    backend: str = "qemu"
    #: MIGRATION events are emitted, hence recorded, only with ``events`` on.
    capabilities: tuple[str, ...] = ("events",)

    def __init__(self, workdir: Path, *, suspend: bool) -> None:
        from cprfsm.qmp import Guest, QmpExecutor  # noqa: PLC0415 - the qmp extra, on demand

        workdir.mkdir(parents=True, exist_ok=True)
        # Sockets live in the executor's folder: too long a path gets a private temporary one.
        short = len(str(workdir)) <= _SOCKET_ROOM
        self._executor: QmpExecutor = QmpExecutor(
            workdir if short else None, guest=Guest.SUSPEND if suspend else Guest.LOOP
        )

    @property
    def executor(self) -> Executor:
        return self._executor

    def booted(self) -> None:
        self._marker(wait=True)  # the guest writes its marker as it boots: wait for it

    def digest(self) -> str:
        return self._marker(wait=False)

    def _marker(self, *, wait: bool) -> str:
        from cprfsm.qmp import read_marker  # noqa: PLC0415 - the qmp extra, on demand

        return read_marker(self._executor, timeout=10.0 if wait else 0.0).hex()

    def state_file_bytes(self, vm: VirtualMachine, uri: str) -> int:
        if uri.startswith("file:"):
            with_options = uri.removeprefix("file:")
            try:
                return Path(with_options.split(",")[0]).stat().st_size
            except OSError:
                return 0
        written = vm.state.state_file(uri)
        return written.bytes_written if written else 0

    def finish(self, vm: VirtualMachine) -> None:
        if vm.state.qemu_running:
            vm.observe(_LATE_EVENTS)  # record what QEMU emitted after the last command

    def close(self) -> None:
        self._executor.close()


@attrs.define
class _Run:
    """One demo run: the VM, its backend, and what was measured on the way."""

    vm: VirtualMachine
    store: SQLiteStore
    guest: _Guest
    options: DemoOptions
    uri: str
    outcome: str = "restored"
    error: str | None = None
    save_seconds: float = 0.0
    restore_seconds: float = 0.0
    digest_before: str = ""
    digest_after: str = ""
    state_file_bytes: int = 0

    @property
    def qemu(self) -> bool:
        return self.guest.backend == "qemu"

    def cycle(self) -> None:
        vm = self.vm
        try:
            if self._save():
                self._restore()
        except IllegalTransition as exc:
            self.outcome = "refused"
            self.error = (
                f"{exc.verdict.first.rule}: {exc.verdict.error}" if exc.verdict.first else str(exc)
            )
            if vm.state.qemu_running:
                self.digest_after = self.guest.digest()
        except (CommandFailed, QemuAbortPredicted) as exc:
            self.outcome = "failed"
            self.error = exc.error
        except ExecutorError as exc:
            self.outcome = "failed"
            self.error = str(exc)

    def _save(self) -> bool:
        """Boot, (suspend), save; False when the migration failed (the guest keeps running)."""
        vm = self.vm
        vm.start()
        self.guest.booted()
        if self.options.suspend:
            vm.guest_suspend()
        self.digest_before = self.guest.digest()
        self._configure()
        started = time.perf_counter()
        saved = vm.migrate(self.uri)
        self.save_seconds = time.perf_counter() - started
        if vm.state.outgoing_status != "completed":
            self.outcome = "migration-failed"
            self.error = _migration_error(saved)
            self.digest_after = self.guest.digest()
            return False
        self.state_file_bytes = self.guest.state_file_bytes(vm, self.uri)
        return True

    def _restore(self) -> None:
        """Quit, (reboot), start with -incoming defer, load, look at the RAM, (wake up)."""
        vm = self.vm
        vm.quit()
        if self.options.reboot:
            vm.reboot_host()
        vm.start(incoming=True)
        self._configure()
        started = time.perf_counter()
        loaded = vm.migrate_incoming(self.uri)
        self.restore_seconds = time.perf_counter() - started
        if not vm.state.qemu_running:
            self.outcome = "restore-failed"
            self.error = vm.state.last_exit
            if self.qemu:
                self.error = _migration_error(loaded) or self.error
            return
        # Before the wakeup: system_wakeup resets the machine and the guest boots again.
        self.digest_after = self.guest.digest()
        if self.options.suspend and vm.state.runstate == "suspended":
            vm.system_wakeup()
        self.guest.finish(vm)

    def _configure(self) -> None:
        self.vm.set_parameters(mode="cpr-reboot")
        capabilities = (*self.options.capabilities, *self.guest.capabilities)
        if capabilities:
            self.vm.set_capabilities(dict.fromkeys(capabilities, True))

    def report(self, *, path: str) -> DemoReport:
        log = [(r.version, r.event) for r in self.store.read(self.vm.state.vm)]
        hazards = tuple(e.rule for _, e in log if isinstance(e, ev.HazardReported))
        lost = any(isinstance(e, ev.GuestDataLost) for _, e in log)
        if self.digest_after and self.digest_before and self.digest_after != self.digest_before:
            lost = True
            if self.qemu and self.error is None:
                self.error = (
                    f"the guest's RAM marker changed: {self.digest_before} -> {self.digest_after}"
                )
        if self.qemu and self.outcome == "restore-failed":
            lost = True  # the saved QEMU has quit and nothing was restored: the guest is gone
        state = self.vm.state
        return DemoReport(
            vm=state.vm,
            store=path,
            backend=self.guest.backend,
            phase=state.phase,
            runstate=state.runstate,
            outcome=self.outcome,
            state_file_bytes=self.state_file_bytes,
            save_seconds=round(self.save_seconds, 6),
            restore_seconds=round(self.restore_seconds, 6),
            ram_digest_before=self.digest_before,
            ram_digest_after=self.digest_after,
            data_lost=lost,
            hazards=hazards,
            error=self.error,
            timeline=_timeline(state.vm, [e for _, e in log]),
        )


def _timeline(vm: str, events: list[Event]) -> tuple[TimelineEntry, ...]:
    state = initial_state(vm)
    entries = []
    for event in events:
        state = fold(state, event)
        entries.append(
            TimelineEntry(
                version=state.version,
                event=type(event).type_tag,
                detail=_detail(event),
                phase=state.phase,
                runstate=state.runstate,
            )
        )
    return tuple(entries)


def _migration_error(events: tuple[Event, ...]) -> str | None:
    for event in events:
        if isinstance(event, ev.MigrationStatusReported) and event.status == "failed":
            return event.error
    return None


def _detail(event: Event) -> str:
    fields = attrs.asdict(event)
    for key in ("runstate", "status", "rule", "operation", "reason", "uri", "error", "detail"):
        value = fields.get(key)
        if value:
            return str(value)
    return ""


def _with_default_path(memory: str, workdir: Path) -> str:
    """A file backend without path= gets one in the demo's (persistent) work folder."""
    kind, *options = memory.split(",")
    if kind == "file" and not any(option.startswith("path=") for option in options):
        return f"{memory},path={workdir / 'guest-ram'}"
    return memory


def _with_progress(ports: Ports, progress: TextIO | None) -> Ports:
    if progress is None:
        return ports
    return attrs.evolve(ports, channel=_ProgressChannel(ports.channel, progress))


class _ProgressChannel:
    """A channel that reports bytes moved on one rewritten line."""

    def __init__(self, inner: Any, out: TextIO) -> None:
        self._inner = inner
        self._out = out

    def open_write(self, uri: str, header: StreamHeader) -> StreamWriter:
        return _ProgressWriter(self._inner.open_write(uri, header), self._show("saving"))

    def open_read(self, uri: str) -> StreamReader:
        return _ProgressReader(self._inner.open_read(uri), self._show("restoring"))

    def _show(self, what: str) -> Callable[..., None]:
        started = time.perf_counter()

        def show(done: int, *, final: bool = False) -> None:
            elapsed = time.perf_counter() - started
            end = "\n" if final else ""
            self._out.write(f"\r  {what}: {done / 2**20:10.1f} MiB in {elapsed:6.2f} s{end}")
            self._out.flush()

        return show


class _ProgressWriter:
    def __init__(self, inner: StreamWriter, show: Callable[..., None]) -> None:
        self._inner = inner
        self._show = show
        self._done = 0

    def write(self, section: str, data: bytes) -> None:
        self._inner.write(section, data)
        self._done += len(data)
        self._show(self._done)

    def commit(self) -> Transfer:
        transfer = self._inner.commit()
        self._show(self._done, final=True)
        return transfer

    def abort(self) -> None:
        self._inner.abort()
        self._show(self._done, final=True)


class _ProgressReader:
    def __init__(self, inner: StreamReader, show: Callable[..., None]) -> None:
        self._inner = inner
        self._show = show
        self._done = 0

    @property
    def header(self) -> StreamHeader:
        return self._inner.header

    def read(self, section: str) -> bytes:
        data = self._inner.read(section)
        self._done += len(data)
        self._show(self._done)
        return data


def default_progress() -> TextIO | None:
    """Standard error when it is a terminal (a live line), else nothing."""
    return sys.stderr if sys.stderr.isatty() else None
