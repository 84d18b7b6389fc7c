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
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import attrs

from cprfsm import _files
from cprfsm import vm_events as ev
from cprfsm._options import parse_device
from cprfsm.exceptions import (
    CommandFailed,
    CprFsmError,
    ExecutorError,
    IllegalTransition,
    PortError,
    QemuAbortPredicted,
    UsageError,
)
from cprfsm.executor import VmDefinition
from cprfsm.legality import MemoryBackend
from cprfsm.lifecycle import fold, initial_state
from cprfsm.machine import VirtualMachine
from cprfsm.simulator import SimulatedQemu, Simulator
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from cprfsm.events import Event
    from cprfsm.executor import Executor
    from cprfsm.ports import Ports, StreamHeader, StreamReader, StreamWriter, Transfer
    from cprfsm.qmp import QmpExecutor

__all__ = [
    "BACKENDS",
    "MAX_RAM",
    "DemoOptions",
    "DemoReport",
    "TimelineEntry",
    "check_resources",
    "default_progress",
    "parse_size",
    "qemu_backend_missing",
    "resolve_backend",
    "run_demo",
    "state_file_path",
]

#: The ``--backend`` choices: ``auto`` is ``qemu`` where it can run the request, else ``sim``.
BACKENDS = ("sim", "qemu", "auto")
#: The QEMU release the qemu backend drives (its model and the tests' guest).
QEMU_RELEASE = "10.0"

#: The largest ``--ram``: 1 PiB, far above any host, far below what overflows a C long.
MAX_RAM = 2**50
_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_MARKER = b"cprfsm-demo-guest"
_QEMU_VERSION = re.compile(r"version (\d+)\.(\d+)\.(\d+)")
# Unix socket paths hold 107 bytes; keep room for the executor's qmpN.sock names.
_SOCKET_ROOM = 96
# A state file's header, device sections and records besides the RAM (generously).
_STATE_ROOM = 2**20
# How long the qemu backend waits at the end for events QEMU still owes (a RESET, a STOP).
_LATE_EVENTS = 0.2


def parse_size(text: str) -> int:
    """Parse a RAM size such as ``64M``, ``1G`` or ``512MiB`` into bytes."""
    match = _SIZE.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise UsageError(f"RAM size {text!r} is not a size such as 64M or 1G")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size > MAX_RAM:
        raise UsageError(
            f"RAM size {text!r} is {size} bytes, more than any host maps "
            f"(at most {_files.human(MAX_RAM)}); give a size such as 64M or 1G"
        )
    return size


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
    vfio = [spec for index, spec in enumerate(devices) if parse_device(spec, index)[0] == "vfio"]
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
    folder = path.parent / f"{path.stem}.d"
    # Everything is checked against a stand-in work folder before any file is made.
    memory, uri = _plan(options, folder / "demo-N", backend, claimed=False)
    check_resources(options, memory, uri, backend)
    with SQLiteStore(path) as store:
        vm_id, workdir = _claim(store, folder)
        memory, uri = _plan(options, workdir, backend, claimed=True)
        definition = VmDefinition(
            memory=memory.unparse(), ram_size=options.ram, devices=options.devices
        )
        guest: _Guest = (
            _QemuGuest(workdir, suspend=options.suspend)
            if backend == "qemu"
            else _SimGuest(workdir, progress)
        )
        vm: VirtualMachine | None = None
        try:
            executor = guest.executor
            vm = VirtualMachine(
                vm_id,
                store=store,
                executor=wrap_executor(executor) if wrap_executor else executor,
                definition=definition,
                strict=options.strict,
            )
            run = _Run(vm=vm, store=store, guest=guest, options=options, uri=uri)
            run.cycle()
            if progress is not None and backend == "sim" and run.restore_seconds:
                progress.write("\n")
            return run.report(path=str(path))
        finally:
            if vm is not None:
                vm.close()  # leave the shared state machine, not only QEMU
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
        try:
            if self._save():
                self._restore()
        except IllegalTransition as exc:
            self.outcome = "refused"
            self.error = (
                f"{exc.verdict.first.rule}: {exc.verdict.error}" if exc.verdict.first else str(exc)
            )
            self._look_again()
        except (CommandFailed, QemuAbortPredicted) as exc:
            self.outcome = "failed"
            self.error = exc.error
            self._look_again()
        except (ExecutorError, PortError) as exc:
            self.outcome = "failed"
            self.error = str(exc)
            self._look_again()

    def _look_again(self) -> None:
        """After a step went wrong: the RAM of a guest still running, if it can be read."""
        state = self.vm.state
        if self.digest_after or not state.qemu_running or state.runstate == "inmigrate":
            return
        try:
            self.digest_after = self.guest.digest()
        except (CprFsmError, OSError):
            self.digest_after = ""  # unreadable: the report counts the data as not back

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
        # Whatever the reason (a wiped state file, a failed load, a changed marker): the
        # guest's data is lost unless a guest runs now with the RAM it had before the save.
        if self.digest_before and self.digest_after != self.digest_before:
            lost = True
            if self.qemu and self.error is None and self.digest_after:
                self.error = (
                    f"the guest's RAM marker changed: {self.digest_before} -> {self.digest_after}"
                )
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


def _claim(store: SQLiteStore, folder: Path) -> tuple[str, Path]:
    """The first free VM name and its new work folder, taken atomically.

    A name is free when its stream is empty; making its folder (``mkdir``, which
    fails if it exists) takes it, so concurrent demos on one store never share one.
    """
    _files.ensure_directory(folder, "the demo's folder")
    for number in itertools.count(1):
        vm_id = f"demo-{number}"
        if store.version(vm_id):
            continue
        workdir = folder / vm_id
        try:
            workdir.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another demo's, or one that stopped before its first event
        return vm_id, workdir
    raise AssertionError  # pragma: no cover - count() never ends


def _plan(
    options: DemoOptions, workdir: Path, backend: str, *, claimed: bool
) -> tuple[MemoryBackend, str]:
    """The memory backend and URI with every file they name absolute and checked.

    A file backend without path= gets one in the (persistent) work folder; relative
    paths are the work folder's and stay in it; an existing target must be a regular
    file (relative ones are looked at only in the ``claimed``, new, work folder).
    """

    def target(name: str, what: str) -> Path:
        path = _files.inside(workdir, name, what)
        if claimed or Path(name).is_absolute():
            _files.refuse_special(path, what)
        return path

    memory = MemoryBackend.parse(options.memory)
    if memory.kind == "file":
        ram = target(memory.path if memory.path is not None else "guest-ram", "the guest RAM file")
        memory = attrs.evolve(memory, path=str(ram))
    uri = options.uri or "file:vm.state"
    scheme, colon, rest = uri.partition(":")
    if scheme == "file" and colon:
        name, offset, at = rest.partition(",offset=")
        uri = f"file:{target(name, 'the state file')}{offset}{at}"
    if backend == "qemu":
        if options.ram % 2**20:
            raise UsageError(
                f"--ram {options.ram} bytes is not a whole number of MiB, as QEMU's -m needs"
            )
        if "," in str(workdir):
            raise UsageError(
                f"the qemu backend cannot name {workdir} on QEMU's command line (a comma "
                "would start an option): give a --store path without a comma"
            )
    return memory, uri


def state_file_path(uri: str) -> Path | None:
    """The file a ``file:`` URI names (without ``,offset=``), else None."""
    scheme, colon, rest = uri.partition(":")
    if scheme != "file" or not colon:
        return None
    return Path(rest.partition(",offset=")[0])


def check_resources(options: DemoOptions, memory: MemoryBackend, uri: str, backend: str) -> None:
    """ResourceError naming the figure if the host cannot hold the demo's RAM or files.

    Anonymous and private RAM needs that much available memory; every backend's RAM
    needs that much address space under ``ulimit -v``; a shared RAM file and the state
    file need that much free space on their filesystems (together if they share one).
    """
    ram = options.ram
    asked = f"--ram {_files.human(ram)}"
    smaller = "give a smaller --ram"
    if memory.kind != "file" or not memory.share:
        _files.require(
            f"guest RAM ({memory.kind}, {asked})",
            ram,
            _files.memory_available(),
            "this host has {} of memory available (MemAvailable)",
            f"{smaller}, or use --memory file,share=on to keep it in a file",
        )
    limit = _files.address_space_limit()
    if limit is not None:
        used = _files.address_space_used() if backend == "sim" else 0
        _files.require(
            asked,
            ram,
            max(limit - used, 0),
            f"the address-space limit (ulimit -v {limit // 1024}) leaves {{}}",
            f"{smaller} or raise ulimit -v",
        )
    files: list[tuple[str, Path, int, int]] = []  # what, path, its size, space it needs
    if memory.kind == "file" and memory.share and memory.path is not None:
        ram_file = Path(memory.path)
        files.append(("the guest RAM file", ram_file, ram, ram - _files.allocated(ram_file)))
    state = state_file_path(uri)
    if state is not None:
        ignored = "x-ignore-shared" in options.capabilities and memory.kind == "file"
        saved = (0 if ignored and memory.share else ram) + _STATE_ROOM
        files.append(("the state file", state, saved, saved))
    size_limit = _files.file_size_limit()
    if size_limit is not None:
        for what, file, size, _ in files:
            _files.require(
                f"{what} {file}",
                size,
                size_limit,
                "the file-size limit (ulimit -f) is {}",
                f"{smaller} or raise ulimit -f",
            )
    by_device: dict[int, tuple[int, int, list[str]]] = {}
    for what, file, _, need in files:
        free, device = _files.free_space(file.parent)
        _, total, names = by_device.get(device, (free, 0, []))
        by_device[device] = (free, total + max(need, 0), [*names, f"{what} {file}"])
    for free, total, names in by_device.values():
        _files.require(
            " and ".join(names),
            total,
            free,
            "their filesystem has {} free",
            f"free some space, {smaller}, or put the files on a filesystem with room",
        )


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
