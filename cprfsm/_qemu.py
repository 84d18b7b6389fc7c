"""QEMU as the model describes it: what each command does, in QEMU's order.

:class:`ModelQemu` carries out one command on a VM state and returns the domain
events QEMU's facts amount to, folding each into its own copy of the state as
it goes.  It acts through parts (:class:`cprfsm.ports.Ports`): the simulator's
parts perform every operation on real memory and files, which makes it the
simulator executor; dry parts perform nothing and make it the machine's
prediction of what any executor will report.  A failing part makes QEMU
compensate, as QEMU does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cprfsm import vm_events as ev
from cprfsm.exceptions import PortError
from cprfsm.executor import (
    Command,
    Exited,
    Fact,
    QmpEvent,
    Report,
    Transferred,
    VmDefinition,
    ram_blocks,
)
from cprfsm.legality import Configuration, MemoryBackend, check, stall
from cprfsm.lifecycle import fold, initial_state
from cprfsm.model import load_model
from cprfsm.ports import Ports, StreamHeader, StreamReader, StreamWriter, Transfer

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cprfsm.events import Event
    from cprfsm.lifecycle import VmState

# Capabilities whose value QEMU writes into the stream and checks on load.
VALIDATED = frozenset({"x-ignore-shared", "mapped-ram"})
_STARTS_AGAIN = frozenset({"running", "inmigrate", "finish-migrate"})
_SHUTDOWN_EXITS = frozenset({"quit", "guest-shutdown"})


class ModelQemu:
    """One QEMU process (and its host) as the model says it behaves."""

    def __init__(self, state: VmState, parts: Ports, definition: VmDefinition) -> None:
        """Act from ``state`` through ``parts``, for a VM started with ``definition``."""
        self.state = state
        self._parts = parts
        self._definition = definition
        self._model = load_model(state.qemu_version)
        self._writer: StreamWriter | None = None
        self._events: list[Event] = []

    def perform(self, command: Command) -> tuple[Event, ...]:
        """Carry out ``command``; the events it amounts to, in QEMU's order."""
        self._events = []
        handler: Callable[..., None] = getattr(self, "_" + command.name.replace("-", "_"))
        handler(**command.arguments)
        return tuple(self._events)

    def report(self, events: tuple[Event, ...]) -> Report:
        """``events`` as an executor reports them: QMP events, transfers, the settled state."""
        return report_of(self.state, events, ram_digest=self._ram_digest())

    def _ram_digest(self) -> str:
        return self._parts.memory.digest() if self.state.qemu_running else ""

    def _emit(self, *events: Event) -> None:
        for event in events:
            self.state = fold(self.state, event)
            if isinstance(event, ev.QemuStarted | ev.QemuUpgraded):
                self._model = load_model(self.state.qemu_version)
            self._events.append(event)

    # --- process and host -------------------------------------------------------------

    def _start(
        self,
        *,
        definition: VmDefinition | None = None,
        paused: bool = False,
        incoming: bool = False,
        qemu: str | None = None,
    ) -> None:
        definition = definition or self._definition
        self._definition = definition
        if qemu is not None and load_model(qemu).version != self.state.qemu_version:
            self._emit(ev.QemuUpgraded(qemu_version=load_model(qemu).version))
        self._parts.host.start_qemu(definition)
        self._emit(
            ev.QemuStarted(
                incarnation=self.state.incarnation + 1,
                qemu_version=self.state.qemu_version,
                host_boot=self.state.host_boot,
                paused=paused,
                incoming=incoming,
                runstate="inmigrate" if incoming else "prelaunch" if paused else "running",
                memory=definition.memory,
                devices=definition.devices,
                aux_ram_share=definition.aux_ram_share,
            )
        )

    def _quit(self) -> None:
        self._shut_down("quit")

    def _shut_down(self, reason: str) -> None:
        """QEMU shuts down; a migration still running is cancelled on the way out."""
        if self.state.outgoing_status in self._model.running_statuses:
            self._status("outgoing", "cancelling")
        self._exit(reason)

    def _reboot_host(self) -> None:
        if self.state.qemu_running:
            self._exit("host-reboot")
        lost = self._parts.host.reboot()
        self._emit(ev.HostRebooted(host_boot=self.state.host_boot + 1, lost=lost))

    def _exit(self, reason: str, detail: str = "") -> None:
        self._parts.host.stop_qemu()
        self._writer = None
        self._emit(ev.QemuExited(incarnation=self.state.incarnation, reason=reason, detail=detail))

    # --- runstate commands ---------------------------------------------------------------

    def _cont(self) -> None:
        state = self.state
        if state.runstate == "inmigrate":
            if not state.autostart:
                self._emit(ev.AutostartChanged(autostart=True))
        elif state.runstate not in {"running", "suspended"}:
            self._emit(ev.VmResumed(runstate=self._resume_target()))

    def _stop(self) -> None:
        state = self.state
        if state.runstate == "inmigrate":
            if state.autostart:
                self._emit(ev.AutostartChanged(autostart=False))
        elif state.runstate in self._model.live_runstates:
            flag = state.runstate == "suspended"
            self._emit(ev.VmStopped(runstate="paused", was_suspended=flag))

    def _debug_stop(self) -> None:
        state = self.state
        if state.runstate in self._model.live_runstates:
            flag = state.runstate == "suspended"
            self._emit(ev.VmStopped(runstate="debug", was_suspended=flag))

    def _guest_suspend(self) -> None:
        if self.state.runstate != "suspended":
            self._emit(ev.GuestSuspended())

    def _system_wakeup(self) -> None:
        self._emit(ev.GuestWokeUp())

    def _guest_reset(self) -> None:
        runstate = self.state.runstate
        target = runstate if runstate in _STARTS_AGAIN else "prelaunch"
        self._emit(ev.GuestReset(runstate=target or "prelaunch"))

    def _guest_shutdown(self) -> None:
        self._shut_down("guest-shutdown")

    # --- migration set-up --------------------------------------------------------------

    def _migrate_set_parameters(self, **parameters: Any) -> None:
        state = self.state
        mode = str(parameters.pop("mode", state.mode))
        merged = dict(state.parameters) | {k: str(v) for k, v in parameters.items()}
        pairs = tuple(sorted(merged.items()))
        if (mode, pairs) != (state.mode, state.parameters):
            self._emit(ev.ParametersSet(mode=mode, parameters=pairs))

    def _migrate_set_capabilities(self, *, capabilities: Mapping[str, bool]) -> None:
        on = {name for name, value in capabilities.items() if value}
        off = {name for name, value in capabilities.items() if not value}
        result = (self.state.capabilities | on) - off
        if result != self.state.capabilities:
            self._emit(ev.CapabilitiesSet(capabilities=result))

    # --- outgoing migration ----------------------------------------------------------------

    def _migrate(self, *, uri: str, rests_in: str | None = None) -> None:
        del rests_in  # a waiting hint for executors that poll QEMU; the model knows
        state = self.state
        config = configuration(state, self._definition, uri=uri)
        verdict = check(config, "migrate", model=self._model, walk=False)
        stalled = stall(config, "migrate", self._model)
        self._emit(
            ev.MigrationStarted(
                uri=uri,
                mode=state.mode,
                capabilities=state.capabilities,
                runstate=state.runstate or "",
                was_suspended=state.was_suspended,
            )
        )
        late_failure = None
        if verdict.first is not None:
            if verdict.first.fails_at == "setup":
                self._status("outgoing", "failed", verdict.first.error)
                return
            late_failure = verdict.first.error
        if state.runstate == "suspended" and "suspended" not in self._model.live_runstates:
            self._emit(ev.GuestWokeUp())  # 8.2 woke the guest first
        header = StreamHeader(
            qemu_version=state.qemu_version,
            mode=state.mode,
            validated=state.capabilities & VALIDATED,
            runstate=self.state.runstate or "",
            was_suspended=self.state.was_suspended or self.state.runstate == "suspended",
        )
        try:
            writer = self._operate(
                "channel.open", lambda: self._parts.channel.open_write(uri, header)
            )
        except PortError as exc:
            self._status("outgoing", "failed", exc.error)
            return
        try:
            self._save(writer, uri, late_failure, stalled=stalled is not None)
        except PortError as exc:
            writer.abort()
            self._compensate("failed", exc.error)

    def _save(
        self, writer: StreamWriter, uri: str, late_failure: str | None, *, stalled: bool
    ) -> None:
        state = self.state
        stops_at_connect = self._model.mode(state.mode).stops_vm == "at-connect"
        if stops_at_connect:
            self._stop_for_migration()
        self._status("outgoing", "active")
        skip = self._skipped_blocks()
        ram = self._operate("ram.save", lambda: self._parts.memory.save(writer, skip))
        self._emit(
            ev.RamSaved(
                bytes_written=ram.bytes,
                written=ram.blocks,
                skipped=tuple(sorted(skip)),
                digest=ram.digest,
            )
        )
        if not stops_at_connect:
            self._stop_for_migration()
        if stalled:  # QEMU reaches device and waits there for good
            self._status("outgoing", "device")
            self._writer = writer
        elif "pause-before-switchover" in state.capabilities and late_failure is None:
            self._writer = writer
            self._status("outgoing", "pre-switchover")
        else:
            self._switch_over(writer, uri, late_failure)

    def _migrate_continue(self, **_: Any) -> None:  # state=pre-switchover, rests_in=...
        writer, self._writer = self._writer, None
        uri = self.state.migration.uri if self.state.migration else ""
        if writer is None:  # a dry prediction: the stream is QEMU's, not the model's
            writer = _LostStream()
        try:
            self._switch_over(writer, uri, None)
        except PortError as exc:
            writer.abort()
            self._compensate("failed", exc.error)

    def _switch_over(self, writer: StreamWriter, uri: str, late_failure: str | None) -> None:
        state = self.state
        if self._model.may_change_status("outgoing", state.outgoing_status, "device"):
            self._status("outgoing", "device")
        devices = self._operate("devices.save", lambda: self._parts.devices.save(writer))
        self._emit(ev.DeviceStateSaved(bytes_written=devices.bytes, digest=devices.digest))
        stream = self._operate("channel.commit", writer.commit)
        plan = state.migration
        assert plan is not None  # a switch-over always belongs to a started migration
        self._emit(
            ev.StateFileWritten(
                uri=uri,
                bytes_written=stream.bytes,
                runstate=plan.runstate,
                was_suspended=plan.was_suspended or plan.runstate == "suspended",
                mode=plan.mode,
                validated=plan.capabilities & VALIDATED,
                qemu_version=state.qemu_version,
                digest=stream.digest,
                ram_in_place=self._ram_in_place(),
                ram_digest=self._parts.memory.digest(),
            )
        )
        if late_failure is not None:  # noticed once the stream is complete
            self._compensate("failed", late_failure)
            return
        self._status("outgoing", "completed")
        self._emit(ev.RunstateSet(runstate="postmigrate", was_suspended=self.state.was_suspended))

    def _migrate_cancel(self, rests_in: str | None = None) -> None:
        del rests_in  # a waiting hint for executors that poll QEMU
        status = self.state.outgoing_status
        if status not in self._model.running_statuses:
            return
        if status == "cancelling":  # QEMU sets (and announces) cancelling again; it stays
            self._status("outgoing", "cancelling")
            return
        stalled = self._stalled()
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        # QEMU restarts the guest while still cancelling; cancelled comes at cleanup.
        self._status("outgoing", "cancelling")
        if stalled:
            return  # the migration thread waits on its return path: cancelling for good
        self._put_back()
        self._status("outgoing", "cancelled")

    # --- incoming migration --------------------------------------------------------------

    def _migrate_incoming(self, *, uri: str, rests_in: str | None = None) -> None:
        del rests_in  # a waiting hint for executors that poll QEMU
        self._emit(ev.IncomingStarted(uri=uri))
        try:
            reader = self._operate("channel.open", lambda: self._parts.channel.open_read(uri))
        except PortError:  # QEMU leaves the incoming side stuck in setup
            return
        self._status("incoming", "active")
        header = reader.header
        local = self.state.capabilities & VALIDATED
        for name in sorted(VALIDATED):
            if (name in local) != (name in header.validated):
                mine, theirs = _on(name in local), _on(name in header.validated)
                self._fail_incoming(
                    f"Capability {name} is {mine}, but received capability is {theirs}"
                )
                return
        try:
            self._load(reader)
        except PortError as exc:
            self._fail_incoming(exc.error)
            return
        if self._incoming_runstate(header):
            self._status("incoming", "completed")

    def _load(self, reader: StreamReader) -> None:
        skip = self._skipped_blocks()
        ram = self._operate("ram.load", lambda: self._parts.memory.load(reader, skip))
        self._emit(
            ev.RamLoaded(
                bytes_read=ram.bytes,
                loaded=ram.blocks,
                kept=tuple(sorted(skip)),
                digest=ram.digest,
            )
        )
        devices = self._operate("devices.load", lambda: self._parts.devices.load(reader))
        self._emit(ev.DeviceStateLoaded(bytes_read=devices.bytes, digest=devices.digest))

    # --- internals -------------------------------------------------------------------------

    def _operate(self, operation: str, action: Callable[[], Any]) -> Any:
        """Run an operation; a PortError is recorded as its failure and re-raised."""
        try:
            return action()
        except PortError as exc:
            self._emit(ev.OperationFailed(operation=operation, error=exc.error))
            raise

    def _status(self, side: str, status: str, error: str = "") -> None:
        self._emit(ev.MigrationStatusReported(side=side, status=status, error=error))

    def _stop_for_migration(self) -> None:
        """QEMU's forced stop into finish-migrate: STOP if live, else a silent change."""
        state = self.state
        if state.runstate in self._model.live_runstates:
            flag = state.runstate == "suspended"
            self._emit(ev.VmStopped(runstate="finish-migrate", was_suspended=flag))
        else:
            self._emit(
                ev.RunstateSet(runstate="finish-migrate", was_suspended=state.was_suspended)
            )

    def _stalled(self) -> bool:
        """Whether the running migration is one the model says never ends."""
        plan = self.state.migration
        if plan is None or self.state.outgoing_status != "device":
            return False
        config = configuration(self.state, self._definition, uri=plan.uri)
        return stall(config, "migrate", self._model) is not None

    def _ram_in_place(self) -> tuple[str, ...]:
        """Paths of the shared RAM files whose content the stream relies on, not holds."""
        skipped = self._skipped_blocks()
        blocks = ram_blocks(self._definition)
        return tuple(sorted(b.path for b in blocks if b.name in skipped and b.path))

    def _skipped_blocks(self) -> frozenset[str]:
        return skipped_blocks(self.state, self._definition)

    def _resume_target(self) -> str:
        """Back to suspended if the guest was suspended (9.0+), else running."""
        live_suspend = "suspended" in self._model.live_runstates
        return "suspended" if self.state.was_suspended and live_suspend else "running"

    def _compensate(self, status: str, error: str) -> None:
        """A failed migration: the status fails first, then the VM is put back."""
        self._status("outgoing", status, error)
        self._put_back()

    def _put_back(self) -> None:
        """Put the VM back where it was before the migration stopped it, as QEMU does."""
        state = self.state
        plan = state.migration
        if plan is None or state.runstate != "finish-migrate":
            return
        if plan.runstate in self._model.live_runstates:
            self._emit(ev.VmResumed(runstate=self._resume_target()))
        elif self._model.may_change_runstate("finish-migrate", plan.runstate):
            self._emit(ev.RunstateSet(runstate=plan.runstate, was_suspended=state.was_suspended))
        else:
            self._exit(
                "abort", f"invalid runstate transition: 'finish-migrate' -> '{plan.runstate}'"
            )

    def _fail_incoming(self, error: str) -> None:
        """A failed load: status failed, then QEMU exits (exit-on-error is on by default)."""
        self._status("incoming", "failed", error)
        self._exit("incoming-failed", error)

    def _incoming_runstate(self, header: StreamHeader) -> bool:
        """Where the destination ends: from the source's runstate, autostart and the flag.

        False when QEMU aborts: a stream whose runstate the table forbids after
        inmigrate (a crafted or foreign one) makes QEMU ask for a change it refuses.
        """
        flag = header.was_suspended or header.runstate == "suspended"
        live = self._model.live_runstates
        if header.runstate in live or header.runstate == "suspended":
            if self.state.autostart:
                target = "suspended" if flag and "suspended" in live else "running"
                self._emit(ev.VmResumed(runstate=target))
            else:
                self._emit(ev.RunstateSet(runstate="paused", was_suspended=flag))
        elif self._model.may_change_runstate("inmigrate", header.runstate):
            self._emit(ev.RunstateSet(runstate=header.runstate, was_suspended=flag))
        else:
            detail = f"invalid runstate transition: 'inmigrate' -> '{header.runstate}'"
            self._exit("abort", detail)
            return False
        return True


class _LostStream:
    """The stream of a prediction that did not open it: writes go nowhere, commits measure 0."""

    def write(self, section: str, data: bytes) -> None:
        del section, data

    def commit(self) -> Transfer:
        return Transfer(bytes=0, digest="")

    def abort(self) -> None:
        pass


_NO_HEADER = StreamHeader(
    qemu_version="", mode="normal", validated=frozenset(), runstate="", was_suspended=False
)


class SimulatedQemu:
    """An executor made of the model's QEMU acting through parts that do the work for real."""

    def __init__(
        self, parts: Ports, *, volatile: Callable[[str], bool], closing: Callable[[], None]
    ) -> None:
        """Act through ``parts``; ``closing`` releases them when the executor is closed."""
        self._parts = parts
        self._volatile = volatile
        self._closing = closing
        self._qemu = ModelQemu(initial_state("simulated"), parts, VmDefinition())

    def execute(self, command: Command) -> Report:
        """Carry ``command`` out as the model says QEMU does, on the parts."""
        if command.name not in _NEEDS_NO_PROCESS and not self._qemu.state.qemu_running:
            return Report(facts=(Exited(message="no QEMU process is running"),))
        if command.name == "start" and self._qemu.state.qemu_running:
            return Report(
                refused="a QEMU process is running already", runstate=self._qemu.state.runstate
            )
        events = self._qemu.perform(command)
        return self._qemu.report(events)

    def observe(self, timeout: float) -> Report:
        """The simulated QEMU says nothing unasked; its current state."""
        del timeout
        return self._qemu.report(())

    def volatile(self, path: str) -> bool:
        """Whether ``path`` is on storage a host reboot wipes."""
        return self._volatile(path)

    def close(self) -> None:
        """Stop the simulated QEMU process."""
        self._closing()


_NEEDS_NO_PROCESS = frozenset({"start", "reboot-host"})


def configuration(state: VmState, definition: VmDefinition, **overrides: Any) -> Configuration:
    """The legality engine's view of ``state`` (``definition`` where no QEMU runs yet)."""
    fields: dict[str, Any] = {
        "mode": state.mode,
        "capabilities": state.capabilities,
        "parameters": dict(state.parameters),
        "runstate": state.runstate or "prelaunch",
        "process": "running" if state.qemu_running else "absent",
        "was_suspended": state.was_suspended,
        "migration": state.outgoing_status,
        "incoming": "completed"
        if state.incoming == "started" and state.incoming_status == "completed"
        else state.incoming,
        "devices": state.devices or definition.devices,
        "memory": MemoryBackend.parse(state.memory if state.qemu_running else definition.memory),
        "aux_ram_share": state.aux_ram_share,
    }
    fields.update(overrides)
    return Configuration(**fields)


def skipped_blocks(state: VmState, definition: VmDefinition) -> frozenset[str]:
    """The RAM blocks QEMU does not transfer: shared named files under x-ignore-shared."""
    if "x-ignore-shared" not in state.capabilities:
        return frozenset()
    return frozenset(b.name for b in ram_blocks(definition) if b.shared and b.named_file)


def report_of(state: VmState, events: tuple[Event, ...], *, ram_digest: str = "") -> Report:
    """What an executor reports for ``events`` that left QEMU in ``state``."""
    facts: list[Fact] = []
    # QEMU emits MIGRATION events only with the events capability on.
    migration_events = "events" in state.capabilities
    for event in events:
        facts.extend(
            fact
            for fact in _facts(event)
            if migration_events or not (isinstance(fact, QmpEvent) and fact.name == "MIGRATION")
        )
    status = state.reported_status
    return Report(
        facts=_shutdown_first(facts),
        runstate=state.runstate,
        status=status if state.qemu_running else "none",
        error=state.migration_error if status == "failed" and state.qemu_running else "",
        ram_digest=ram_digest,
        lost=next((e.lost for e in events if isinstance(e, ev.HostRebooted)), ()),
    )


def _shutdown_first(facts: list[Fact]) -> tuple[Fact, ...]:
    """QEMU emits SHUTDOWN as it begins to quit, then cancels a running migration.

    The log keeps the cancelling status before the exit, so that the fold sees the
    status change while the process still exists; QEMU's order is restored here.
    """
    ordered = list(facts)
    for index in range(len(ordered) - 1):
        first, second = ordered[index], ordered[index + 1]
        if (
            isinstance(first, QmpEvent)
            and first.label == "MIGRATION cancelling"
            and isinstance(second, QmpEvent)
            and second.name == "SHUTDOWN"
        ):
            ordered[index], ordered[index + 1] = second, first
    return tuple(ordered)


_PLAIN: dict[type[Any], str] = {
    ev.VmStopped: "STOP",
    ev.VmResumed: "RESUME",
    ev.GuestSuspended: "SUSPEND",
    ev.GuestWokeUp: "WAKEUP",
    ev.GuestReset: "RESET",
}
_TRANSFERS: dict[type[Any], str] = {
    ev.RamSaved: "ram.save",
    ev.DeviceStateSaved: "devices.save",
    ev.StateFileWritten: "stream.commit",
    ev.RamLoaded: "ram.load",
    ev.DeviceStateLoaded: "devices.load",
}


def _facts(event: Event) -> tuple[Fact, ...]:  # noqa: PLR0911 - one return per kind of fact
    kind = type(event)
    if kind in _PLAIN:
        return (QmpEvent(name=_PLAIN[kind]),)
    if isinstance(event, ev.MigrationStarted | ev.IncomingStarted):
        return (QmpEvent(name="MIGRATION", data={"status": "setup"}),)
    if isinstance(event, ev.MigrationStatusReported):
        return (QmpEvent(name="MIGRATION", data={"status": event.status}),)
    if isinstance(event, ev.QemuExited):
        if event.reason in _SHUTDOWN_EXITS:
            return (QmpEvent(name="SHUTDOWN"), Exited(code=0))
        if event.reason == "abort":
            return (Exited(signal=6, message=event.detail),)
        if event.reason == "incoming-failed":
            return (Exited(code=1, message=event.detail),)
        return (Exited(signal=9, message=event.detail),)
    if kind in _TRANSFERS:
        return (_transferred(_TRANSFERS[kind], event),)
    return ()


def _transferred(operation: str, event: Any) -> Transferred:
    moved = getattr(event, "bytes_written", None)
    if moved is None:
        moved = event.bytes_read
    blocks: tuple[str, ...] = getattr(event, "written", ()) or getattr(event, "loaded", ())
    return Transferred(operation=operation, bytes=moved, digest=event.digest, blocks=blocks)


def predict(
    state: VmState,
    definition: VmDefinition,
    command: Command,
    *,
    volatile: Callable[[str], bool],
    failing: tuple[str, str] | None = None,
) -> tuple[tuple[Event, ...], VmState, tuple[str, ...]]:
    """What the model says ``command`` does from ``state``, performing nothing.

    With ``failing`` (an operation and QEMU's error text) that operation fails.
    Returns the events, the state after them, and the operations QEMU ran on the way.
    """
    parts = _DryParts(state, definition, volatile, failing)
    qemu = ModelQemu(state, parts.ports(), definition)
    events = qemu.perform(command)
    return events, qemu.state, tuple(parts.operations)


class _DryParts:
    """Parts that perform nothing: streams are known from the log, transfers measure nothing."""

    def __init__(
        self,
        state: VmState,
        definition: VmDefinition,
        volatile: Callable[[str], bool],
        failing: tuple[str, str] | None,
    ) -> None:
        self._state = state
        self._definition = definition
        self._volatile = volatile
        self._failing = failing
        self.operations: list[str] = []

    def ports(self) -> Ports:
        return Ports(memory=self, devices=_DryDevices(self), channel=self, host=self)

    def run(self, operation: str) -> None:
        self.operations.append(operation)
        if self._failing is not None and self._failing[0] == operation:
            raise PortError(self._failing[1])

    # host
    def start_qemu(self, definition: VmDefinition) -> None:
        self._definition = definition

    def stop_qemu(self) -> None:
        pass

    def reboot(self) -> tuple[str, ...]:
        lost = [f.uri for f in self._state.state_files if _volatile_uri(f.uri, self._volatile)]
        lost += [b.path for b in ram_blocks(self._definition) if b.path and self._volatile(b.path)]
        return tuple(sorted(set(lost)))

    def volatile(self, path: str) -> bool:
        return self._volatile(path)

    # memory
    def blocks(self) -> tuple[Any, ...]:
        return ram_blocks(self._definition)

    def save(self, writer: StreamWriter, skip: frozenset[str]) -> Transfer:
        del writer
        self.run("ram.save")
        return Transfer(bytes=0, digest="", blocks=self._moved(skip))

    def load(self, reader: StreamReader, skip: frozenset[str]) -> Transfer:
        del reader
        self.run("ram.load")
        return Transfer(bytes=0, digest="", blocks=self._moved(skip))

    def digest(self) -> str:
        return ""

    def _moved(self, skip: frozenset[str]) -> tuple[str, ...]:
        return tuple(b.name for b in ram_blocks(self._definition) if b.name not in skip)

    # channel
    def open_write(self, uri: str, header: StreamHeader) -> StreamWriter:
        del uri, header
        self.run("channel.open")
        return _DryStream(self)

    def open_read(self, uri: str) -> StreamReader:
        self.run("channel.open")
        saved = self._state.state_file(uri)
        if saved is None:
            path = uri.partition(":")[2]
            raise PortError(f"Could not open '{path}': No such file or directory")
        return _DryStream(
            self,
            StreamHeader(
                qemu_version=saved.qemu_version,
                mode=saved.mode,
                validated=saved.validated,
                runstate=saved.runstate,
                was_suspended=saved.was_suspended,
            ),
        )


class _DryDevices:
    def __init__(self, parts: _DryParts) -> None:
        self._parts = parts

    def save(self, writer: StreamWriter) -> Transfer:
        del writer
        self._parts.run("devices.save")
        return Transfer(bytes=0, digest="")

    def load(self, reader: StreamReader) -> Transfer:
        del reader
        self._parts.run("devices.load")
        return Transfer(bytes=0, digest="")


class _DryStream:
    def __init__(self, parts: _DryParts, header: StreamHeader = _NO_HEADER) -> None:
        self._parts = parts
        self.header = header

    def write(self, section: str, data: bytes) -> None:
        del section, data

    def commit(self) -> Transfer:
        self._parts.run("channel.commit")
        return Transfer(bytes=0, digest="")

    def abort(self) -> None:
        pass

    def read(self, section: str) -> bytes:
        del section
        return b""


def _volatile_uri(uri: str, volatile: Callable[[str], bool]) -> bool:
    scheme, _, path = uri.partition(":")
    return scheme == "file" and volatile(path.partition(",")[0])


def _on(value: bool) -> str:  # noqa: FBT001 - QEMU's on/off spelling
    return "on" if value else "off"


__all__ = [
    "VALIDATED",
    "ModelQemu",
    "SimulatedQemu",
    "configuration",
    "predict",
    "report_of",
    "skipped_blocks",
]
