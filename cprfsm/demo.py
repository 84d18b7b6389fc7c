"""``cprfsm demo``: a whole cpr-reboot cycle on the simulator, recorded in an SQLite store.

Start a guest, let it write recognisable RAM, (suspend it), save it with
``migrate`` in mode cpr-reboot, quit QEMU, (reboot the host), start a new QEMU
with ``-incoming defer``, restore, (wake it up) — each step decided by the
model, performed for real by :class:`~cprfsm.simulator.Simulator`, and recorded.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from cprfsm import vm_events as ev
from cprfsm._qemu import SimulatedQemu
from cprfsm.exceptions import IllegalTransition, UsageError
from cprfsm.lifecycle import fold, initial_state
from cprfsm.machine import CommandFailed, QemuAbortPredicted, VirtualMachine
from cprfsm.ports import Ports, StreamHeader, StreamReader, StreamWriter, Transfer, VmDefinition
from cprfsm.simulator import Simulator
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from cprfsm.events import Event

__all__ = [
    "DemoOptions",
    "DemoReport",
    "TimelineEntry",
    "default_progress",
    "parse_size",
    "run_demo",
]

_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_MARKER = b"cprfsm-demo-guest"


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


@attrs.frozen(kw_only=True)
class DemoReport:
    """What happened: the end state, timings, digests, hazards and the timeline."""

    vm: str
    store: str
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


def run_demo(options: DemoOptions, *, progress: TextIO | None = None) -> DemoReport:
    """Run the cycle; ``progress`` (e.g. a terminal) gets a live line for saves and restores."""
    path = options.store.resolve()
    with SQLiteStore(path) as store:
        vm_id = f"demo-{len(store.streams()) + 1}"
        workdir = path.parent / f"{path.stem}.d" / vm_id
        definition = VmDefinition(
            memory=_with_default_path(options.memory, workdir),
            ram_size=options.ram,
            devices=options.devices,
        )
        with Simulator(workdir) as simulator:
            vm = VirtualMachine(
                vm_id,
                store=store,
                executor=SimulatedQemu(
                    _with_progress(simulator.ports(), progress),
                    volatile=simulator.ports().host.volatile,
                    closing=simulator.close,
                ),
                definition=definition,
                strict=options.strict,
            )
            uri = options.uri or f"file:{workdir / 'vm.state'}"
            run = _Run(vm=vm, store=store, simulator=simulator, options=options, uri=uri)
            run.cycle()
            if progress is not None and run.restore_seconds:
                progress.write("\n")
            return run.report(path=str(path))


@attrs.define
class _Run:
    """One demo run: the VM, the simulator, and what was measured on the way."""

    vm: VirtualMachine
    store: SQLiteStore
    simulator: Simulator
    options: DemoOptions
    uri: str
    outcome: str = "restored"
    error: str | None = None
    save_seconds: float = 0.0
    restore_seconds: float = 0.0
    digest_before: str = ""
    digest_after: str = ""
    state_file_bytes: int = 0

    def cycle(self) -> None:
        vm, options = self.vm, self.options
        try:
            vm.start()
            self.simulator.guest_write(_MARKER, seed=1)
            if options.suspend:
                vm.guest_suspend()
            self.digest_before = self.simulator.ram_digest()
            self._configure()
            started = time.perf_counter()
            saved = vm.migrate(self.uri)
            self.save_seconds = time.perf_counter() - started
            if vm.state.outgoing_status != "completed":
                self.outcome = "migration-failed"
                self.error = _migration_error(saved)
                self.digest_after = self.simulator.ram_digest()
                return
            written = vm.state.state_file(self.uri)
            self.state_file_bytes = written.bytes_written if written else 0
            vm.quit()
            if options.reboot:
                vm.reboot_host()
            vm.start(incoming=True)
            self._configure()
            started = time.perf_counter()
            vm.migrate_incoming(self.uri)
            self.restore_seconds = time.perf_counter() - started
            if not vm.state.qemu_running:
                self.outcome = "restore-failed"
                self.error = vm.state.last_exit
                return
            self.digest_after = self.simulator.ram_digest()
            if options.suspend and vm.state.runstate == "suspended":
                vm.system_wakeup()
        except IllegalTransition as exc:
            self.outcome = "refused"
            self.error = (
                f"{exc.verdict.first.rule}: {exc.verdict.error}" if exc.verdict.first else str(exc)
            )
            if vm.state.qemu_running:
                self.digest_after = self.simulator.ram_digest()
        except (CommandFailed, QemuAbortPredicted) as exc:
            self.outcome = "failed"
            self.error = exc.error

    def _configure(self) -> None:
        self.vm.set_parameters(mode="cpr-reboot")
        if self.options.capabilities:
            self.vm.set_capabilities(dict.fromkeys(self.options.capabilities, True))

    def report(self, *, path: str) -> DemoReport:
        log = [(r.version, r.event) for r in self.store.read(self.vm.state.vm)]
        hazards = tuple(e.rule for _, e in log if isinstance(e, ev.HazardReported))
        lost = any(isinstance(e, ev.GuestDataLost) for _, e in log)
        if self.digest_after and self.digest_before and self.digest_after != self.digest_before:
            lost = True
        state = self.vm.state
        return DemoReport(
            vm=state.vm,
            store=path,
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
