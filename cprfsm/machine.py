"""The live lifecycle controller of one VM: decide, record the intent, act, record the outcome.

Every command is decided by the legality engine first.  A refusal raises
:class:`~cprfsm.IllegalTransition` and changes nothing: no event, no port call.
An accepted command appends QEMU's facts to the event store, performs device
and memory operations through the ports in QEMU's order (the intent recorded
before, the outcome after), and moves the live runstate through QEMU's table.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec

import structlog

from cprfsm import vm_events as ev
from cprfsm._engine import LiveRunstate
from cprfsm.exceptions import CprFsmError, IllegalTransition, UnknownNameError, UsageError
from cprfsm.hazards import Hazard, hazards_of
from cprfsm.legality import Configuration, MemoryBackend, Reason, Verdict, check
from cprfsm.lifecycle import VmState, fold, rebuild
from cprfsm.model import load_model
from cprfsm.ports import PortError, Ports, StreamHeader, StreamWriter, VmDefinition

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cprfsm.events import Event
    from cprfsm.store import EventStore

__all__ = ["CommandFailed", "QemuAbortPredicted", "VirtualMachine"]

# Capabilities whose value QEMU writes into the stream and checks on load.
_VALIDATED = frozenset({"x-ignore-shared", "mapped-ram"})
_STARTS_AGAIN = frozenset({"running", "inmigrate", "finish-migrate"})
_VERDICT_CACHE = 256
_INTERRUPTED = "interrupted: the controller stopped before the outcome was recorded"


class CommandFailed(CprFsmError):
    """QEMU accepted the command, then it failed with ``error``; ``events`` say what happened."""

    def __init__(self, command: str, error: str, events: tuple[Event, ...]) -> None:
        """Carry the command, QEMU's text and the events recorded on the way."""
        self.command = command
        self.error = error
        self.events = events
        super().__init__(f"{command} failed: {error}")


class QemuAbortPredicted(CprFsmError):
    """QEMU's own logic asks for a runstate change its table forbids: QEMU aborts there.

    Predicted before acting, nothing is recorded and ``events`` is empty.  When
    the abort follows a failed operation, the process is gone and ``events``
    ends with its exit.
    """

    def __init__(self, error: str, events: tuple[Event, ...]) -> None:
        """Carry what QEMU prints as it aborts and the events recorded up to the abort."""
        self.error = error
        self.events = events
        super().__init__(f"{error}: QEMU aborts here, the process is gone")


_P = ParamSpec("_P")


def _command(
    method: Callable[Concatenate[VirtualMachine, _P], None],
) -> Callable[Concatenate[VirtualMachine, _P], tuple[Event, ...]]:
    """Make a command return the events it recorded, in order (empty when nothing changed)."""

    @functools.wraps(method)
    def run(self: VirtualMachine, /, *args: _P.args, **kwargs: _P.kwargs) -> tuple[Event, ...]:
        self._batch = []
        method(self, *args, **kwargs)
        return tuple(self._batch)

    return run


class VirtualMachine:
    """One VM's lifecycle controller over an event store and four ports.

    Every command returns the events it recorded (empty when nothing changed).
    """

    def __init__(  # noqa: PLR0913 - keyword-only settings of one VM
        self,
        vm: str,
        *,
        store: EventStore,
        ports: Ports,
        definition: VmDefinition | None = None,
        qemu: str | None = None,
        strict: bool = False,
    ) -> None:
        """Load the VM's log from ``store`` (``qemu`` is the release installed if it is new).

        With ``strict`` a step with a data-loss hazard is refused; by default the
        hazard is recorded (HazardReported) and the step goes ahead, as QEMU would.
        """
        self._vm = vm
        self._strict = strict
        self._store = store
        self._ports = ports
        self._definition = definition or VmDefinition()
        state = rebuild(store, vm, qemu=qemu)
        self._state = state
        self._model = load_model(state.qemu_version)
        self._runstate = LiveRunstate(self._model, state.runstate)
        self._writer: StreamWriter | None = None
        self._batch: list[Event] = []
        # Verdicts depend only on the fields in can()'s key, and a VM revisits
        # few of them: deciding stop/cont again costs a dict lookup.
        self._verdicts: dict[tuple[object, ...], Verdict] = {}
        # Not bound once here: a bound logger would freeze the logging configuration
        # in force now, and callers (and capture_logs) may configure structlog later.
        self._log = structlog.get_logger("cprfsm")

    @property
    def state(self) -> VmState:
        """The faithful state after every recorded event."""
        return self._state

    @property
    def runstate(self) -> str | None:
        """The live runstate as the transitions machine holds it (None without QEMU)."""
        return self._runstate.runstate

    def save_snapshot(self) -> None:
        """Keep the current state in the store, so loading replays only the tail after it."""
        self._store.save_snapshot(self._vm, self._state.version, self._state.to_json())

    def can(self, command: str, **arguments: Any) -> Verdict:
        """Would QEMU accept ``command`` now?  The verdict, without acting."""
        state = self._state
        key = (
            command,
            self._model.version,
            state.mode,
            state.capabilities,
            state.parameters,
            state.runstate,
            state.was_suspended,
            state.outgoing_status,
            state.incoming,
            state.incoming_status,
            state.devices,
            state.memory,
            state.aux_ram_share,
            tuple(sorted((name, _hashable(value)) for name, value in arguments.items())),
        )
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) >= _VERDICT_CACHE:
                self._verdicts.clear()
            verdict = check(self._config(**arguments), command, model=self._model, walk=False)
            self._verdicts[key] = verdict
        return verdict

    # --- process and host -------------------------------------------------------------

    @_command
    def start(self, *, paused: bool = False, incoming: bool = False) -> None:
        """Start QEMU (``-S`` with ``paused``, ``-incoming defer`` with ``incoming``)."""
        self._require_no_qemu("start")
        if not incoming:
            self._guard("start")
        self._ports.host.start_qemu(self._definition)
        runstate = "inmigrate" if incoming else "prelaunch" if paused else "running"
        self._record(
            "start",
            ev.QemuStarted(
                incarnation=self._state.incarnation + 1,
                qemu_version=self._state.qemu_version,
                host_boot=self._state.host_boot,
                paused=paused,
                incoming=incoming,
                runstate=runstate,
                memory=self._definition.memory,
                devices=self._definition.devices,
                aux_ram_share=self._definition.aux_ram_share,
            ),
        )

    @_command
    def quit(self) -> None:
        """Quit QEMU (QMP ``quit``)."""
        self._require_qemu("quit")
        self._exit("quit", "quit")

    @_command
    def reboot_host(self) -> None:
        """Reboot the host; a running QEMU dies with it, volatile storage is wiped."""
        self._guard("reboot_host")
        if self._state.qemu_running:
            self._exit("reboot_host", "host-reboot")
        lost = self._ports.host.reboot()
        self._record(
            "reboot_host", ev.HostRebooted(host_boot=self._state.host_boot + 1, lost=lost)
        )

    @_command
    def upgrade_qemu(self, version: str) -> None:
        """Install another QEMU release between quit and the next start."""
        self._require_no_qemu("upgrade_qemu")
        target = load_model(version).version
        if target == self._state.qemu_version:
            return
        self._record("upgrade_qemu", ev.QemuUpgraded(qemu_version=target))

    # --- runstate commands ---------------------------------------------------------------

    @_command
    def cont(self) -> None:
        """QMP ``cont``: resume (into suspended if the guest was suspended when stopped)."""
        self._decide("cont")
        state = self._state
        if state.runstate == "inmigrate":
            self._autostart(value=True)
            return
        if state.runstate in {"running", "suspended"}:
            return
        self._record("cont", ev.VmResumed(runstate=self._resume_target()))

    @_command
    def stop(self) -> None:
        """QMP ``stop``: pause a live VM (a no-op on a stopped one)."""
        self._decide("stop")
        state = self._state
        if state.runstate == "inmigrate":
            self._autostart(value=False)
            return
        if state.runstate not in self._model.live_runstates:
            return
        flag = state.runstate == "suspended"
        self._record("stop", ev.VmStopped(runstate="paused", was_suspended=flag))

    @_command
    def debug_stop(self) -> None:
        """The gdbstub stops a live VM in runstate ``debug``."""
        self._require_qemu("debug_stop")
        state = self._state
        if state.runstate not in self._model.live_runstates:
            return
        if not self._model.may_change_runstate(state.runstate, "debug"):
            raise QemuAbortPredicted(
                f"invalid runstate transition: '{state.runstate}' -> 'debug'", ()
            )
        flag = state.runstate == "suspended"
        self._record("debug_stop", ev.VmStopped(runstate="debug", was_suspended=flag))

    @_command
    def guest_suspend(self) -> None:
        """The guest enters ACPI S3 (what guest-suspend-ram asks it to do)."""
        self._require_qemu("guest_suspend")
        if self._state.runstate == "suspended":
            return
        if self._state.runstate != "running":
            self._refuse(
                "guest_suspend",
                rule="guest-not-running",
                error=f"the guest cannot suspend itself in runstate {self._state.runstate}",
                hint="cont the VM first; only a running guest can enter S3",
            )
        self._record("guest_suspend", ev.GuestSuspended())

    @_command
    def system_wakeup(self) -> None:
        """QMP ``system_wakeup``: wake a suspended guest."""
        self._decide("system_wakeup")
        self._record("system_wakeup", ev.GuestWokeUp())

    @_command
    def guest_reset(self) -> None:
        """The guest (or system_reset) resets; a stopped VM lands in prelaunch."""
        self._require_qemu("guest_reset")
        runstate = self._state.runstate
        target = runstate if runstate in _STARTS_AGAIN else "prelaunch"
        self._record("guest_reset", ev.GuestReset(runstate=target or "prelaunch"))

    @_command
    def guest_shutdown(self) -> None:
        """The guest powers off; QEMU exits (the default shutdown action)."""
        self._require_qemu("guest_shutdown")
        self._exit("guest_shutdown", "guest-shutdown")

    # --- migration set-up --------------------------------------------------------------

    @_command
    def set_parameters(
        self, *, mode: str | None = None, parameters: Mapping[str, str] | None = None
    ) -> None:
        """QMP ``migrate-set-parameters``: the mode and other parameters."""
        state = self._state
        merged = dict(state.parameters) | dict(parameters or {})
        new_mode = mode or state.mode
        self._decide("migrate-set-parameters", mode=new_mode, parameters=merged)
        pairs = tuple(sorted(merged.items()))
        if (new_mode, pairs) == (state.mode, state.parameters):
            return
        self._record("migrate-set-parameters", ev.ParametersSet(mode=new_mode, parameters=pairs))

    @_command
    def set_capabilities(self, changes: Mapping[str, bool]) -> None:
        """QMP ``migrate-set-capabilities``: turn capabilities on or off (checked as a whole)."""
        on = {name for name, value in changes.items() if value}
        off = {name for name, value in changes.items() if not value}
        result = (self._state.capabilities | on) - off
        unknown = sorted((on | off) - set(self._model.capabilities))
        if unknown:
            context = f"QEMU {self._model.version}"
            raise UnknownNameError(
                "capability", unknown[0], self._model.capabilities, context=context
            )
        self._decide("migrate-set-capabilities", capabilities=result)
        if result == self._state.capabilities:
            return
        self._record("migrate-set-capabilities", ev.CapabilitiesSet(capabilities=result))

    # --- outgoing migration ----------------------------------------------------------------

    @_command
    def migrate(self, uri: str) -> None:
        """QMP ``migrate`` to ``uri``: save the VM in this mode, in QEMU's order."""
        verdict = self._decide("migrate", uri=uri)
        state = self._state
        if state.mode == "cpr-transfer" or "background-snapshot" in state.capabilities:
            msg = (
                "the lifecycle machine models normal and cpr-reboot saves to a URI; "
                "cpr-transfer and background snapshots are not modelled yet (use check())"
            )
            raise UsageError(msg)
        hazards = self._hazards("migrate", uri=uri, skipped=self._skipped_blocks())
        self._record(
            "migrate",
            ev.MigrationStarted(
                uri=uri,
                mode=state.mode,
                capabilities=state.capabilities,
                runstate=state.runstate or "",
                was_suspended=state.was_suspended,
            ),
        )
        # After MigrationStarted, which opens a new save's account of hazards.
        self._report("migrate", hazards)
        late_failure = None  # only an asynchronous failure gets past _decide
        if verdict.first is not None:
            if verdict.first.fails_at == "setup":
                self._status("migrate", "outgoing", "failed", verdict.first.error)
                return
            late_failure = verdict.first.error
        if state.runstate == "suspended" and "suspended" not in self._model.live_runstates:
            self._record("migrate", ev.GuestWokeUp())  # 8.2 woke the guest first
        header = StreamHeader(
            qemu_version=state.qemu_version,
            mode=state.mode,
            validated=state.capabilities & _VALIDATED,
            runstate=self._state.runstate or "",
            was_suspended=self._state.was_suspended or self._state.runstate == "suspended",
        )
        try:
            writer = self._operate(
                "migrate", "channel.open", uri, lambda: self._ports.channel.open_write(uri, header)
            )
        except PortError as exc:
            self._status("migrate", "outgoing", "failed", exc.error)
            raise CommandFailed("migrate", exc.error, tuple(self._batch)) from None
        try:
            self._save(writer, uri, late_failure)
        except PortError as exc:
            writer.abort()
            self._compensate("migrate", "failed", exc.error)

    def _save(self, writer: StreamWriter, uri: str, late_failure: str | None) -> None:
        """Stop the VM when the mode says, write RAM, then fail, pause or switch over."""
        state = self._state
        stops_at_connect = self._model.mode(state.mode).stops_vm == "at-connect"
        if stops_at_connect:
            self._stop_for_migration()
        self._status("migrate", "outgoing", "active")
        skip = self._skipped_blocks()
        ram = self._operate(
            "migrate", "ram.save", uri, lambda: self._ports.memory.save(writer, skip)
        )
        self._record(
            "migrate",
            ev.RamSaved(
                bytes_written=ram.bytes,
                written=ram.blocks,
                skipped=tuple(sorted(skip)),
                digest=ram.digest,
            ),
        )
        if not stops_at_connect:
            self._stop_for_migration()
        if late_failure is not None:  # noticed only once the switch-over began
            if self._model.may_change_status("outgoing", self._state.outgoing_status, "device"):
                self._status("migrate", "outgoing", "device")
            writer.abort()
            self._compensate("migrate", "failed", late_failure)
        elif "pause-before-switchover" in state.capabilities:
            self._writer = writer
            self._status("migrate", "outgoing", "pre-switchover")
        else:
            self._switch_over(writer)

    @_command
    def migrate_continue(self) -> None:
        """QMP ``migrate-continue``: leave pre-switchover and complete the migration."""
        self._require_qemu("migrate-continue")
        status = self._state.outgoing_status
        if status == "pre-switchover" and self._writer is None:
            self._refuse(
                "migrate-continue",
                rule="stream-lost",
                error="the migration stream was opened by a controller that is gone",
                hint="cancel the migration with migrate_cancel and migrate again",
            )
        if status != "pre-switchover" or self._writer is None:
            self._refuse(
                "migrate-continue",
                rule="continue-needs-pre-switchover",
                error=f"Migration not in expected state: {status}",
                hint="migrate-continue only applies to a migration paused in pre-switchover",
                source="migration/migration.c:qmp_migrate_continue",
            )
        writer, self._writer = self._writer, None
        try:
            self._switch_over(writer)
        except PortError as exc:
            writer.abort()
            self._compensate("migrate-continue", "failed", exc.error)

    @_command
    def recover(self) -> None:
        """Settle an operation whose intent is in the log but whose outcome is not.

        That happens when the controller died mid-operation.  The operation is
        recorded as failed and QEMU's compensation follows: an outgoing
        migration fails and the guest resumes; an incoming one fails and that
        QEMU exits.  Without an operation in flight this does nothing.
        """
        in_flight = self._state.in_flight
        if in_flight is None:
            return
        self._record("recover", ev.OperationFailed(operation=in_flight[0], error=_INTERRUPTED))
        if self._state.outgoing_status in self._model.running_statuses:
            self._compensate("recover", "failed", _INTERRUPTED)
        elif self._state.incoming_status in self._model.running_statuses:
            self._fail_incoming(_INTERRUPTED)

    @_command
    def migrate_cancel(self) -> None:
        """QMP ``migrate_cancel``: cancel a migration in progress (a no-op otherwise)."""
        self._require_qemu("migrate_cancel")
        if self._state.outgoing_status not in self._model.running_statuses:
            return
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        # QEMU restarts the guest while still cancelling; cancelled comes at cleanup.
        self._status("migrate_cancel", "outgoing", "cancelling")
        self._put_back("migrate_cancel")
        self._status("migrate_cancel", "outgoing", "cancelled")

    # --- incoming migration --------------------------------------------------------------

    @_command
    def migrate_incoming(self, uri: str) -> None:
        """QMP ``migrate-incoming``: load the VM from ``uri`` into this waiting QEMU."""
        self._decide("migrate-incoming", uri=uri)
        self._record("migrate-incoming", ev.IncomingStarted(uri=uri))
        try:
            reader = self._operate(
                "migrate-incoming", "channel.open", uri, lambda: self._ports.channel.open_read(uri)
            )
        except PortError as exc:  # QEMU leaves the incoming side stuck in setup
            raise CommandFailed("migrate-incoming", exc.error, tuple(self._batch)) from None
        self._status("migrate-incoming", "incoming", "active")
        header = reader.header
        local = self._state.capabilities & _VALIDATED
        for name in sorted(_VALIDATED):
            if (name in local) != (name in header.validated):
                mine, theirs = _on(name in local), _on(name in header.validated)
                self._fail_incoming(
                    f"Capability {name} is {mine}, but received capability is {theirs}"
                )
                return
        try:
            skip = self._skipped_blocks()
            ram = self._operate(
                "migrate-incoming", "ram.load", uri, lambda: self._ports.memory.load(reader, skip)
            )
            self._record(
                "migrate-incoming",
                ev.RamLoaded(
                    bytes_read=ram.bytes,
                    loaded=ram.blocks,
                    kept=tuple(sorted(skip)),
                    digest=ram.digest,
                ),
            )
            devices = self._operate(
                "migrate-incoming", "devices.load", uri, lambda: self._ports.devices.load(reader)
            )
            self._record(
                "migrate-incoming",
                ev.DeviceStateLoaded(bytes_read=devices.bytes, digest=devices.digest),
            )
        except PortError as exc:
            self._fail_incoming(exc.error)
            return
        self._check_restored_ram(uri)
        self._incoming_runstate(header)
        self._status("migrate-incoming", "incoming", "completed")

    # --- internals -------------------------------------------------------------------------

    def _config(self, **overrides: Any) -> Configuration:
        state = self._state
        fields: dict[str, Any] = {
            "mode": state.mode,
            "capabilities": state.capabilities,
            "parameters": dict(state.parameters),
            "runstate": state.runstate or "prelaunch",
            "was_suspended": state.was_suspended,
            "migration": state.outgoing_status,
            "incoming": "completed"
            if state.incoming == "started" and state.incoming_status == "completed"
            else state.incoming,
            "devices": state.devices or self._definition.devices,
            "memory": MemoryBackend.parse(
                state.memory if state.qemu_running else self._definition.memory
            ),
            "aux_ram_share": state.aux_ram_share,
        }
        fields.update(overrides)
        return Configuration(**fields)

    def _decide(self, command: str, **overrides: Any) -> Verdict:
        self._require_qemu(command)
        verdict = self.can(command, **overrides)
        if verdict.first is not None and verdict.first.aborts:
            self._log.info(
                "transition.abort-predicted", vm=self._vm, command=command, error=verdict.error
            )
            raise QemuAbortPredicted(verdict.first.error, ())
        if verdict.first is not None and not verdict.first.asynchronous:
            self._log.info(
                "transition.refused",
                vm=self._vm,
                command=command,
                runstate=self._state.runstate,
                reasons=[reason.rule for reason in verdict.reasons],
                error=verdict.error,
            )
            raise IllegalTransition(verdict)
        return verdict

    def _refuse(
        self, command: str, *, rule: str, error: str, hint: str, source: str = "cprfsm"
    ) -> NoReturn:
        reason = Reason(
            rule=rule, command=command, asynchronous=False, error=error, source=source, hint=hint
        )
        verdict = Verdict(
            qemu=self._model.version, command=command, steps=(command,), reasons=(reason,)
        )
        self._log.info(
            "transition.refused", vm=self._vm, command=command, reasons=[rule], error=error
        )
        raise IllegalTransition(verdict)

    def _require_qemu(self, command: str) -> None:
        if not self._state.qemu_running:
            self._refuse(
                command,
                rule="qemu-not-running",
                error="QEMU is not running",
                hint="start QEMU first",
            )

    def _require_no_qemu(self, command: str) -> None:
        if self._state.qemu_running:
            self._refuse(
                command,
                rule="qemu-running",
                error=f"QEMU {self._state.qemu_version} is running "
                f"(incarnation {self._state.incarnation})",
                hint="quit QEMU first",
            )

    def _record(self, command: str, *events: Event) -> None:
        """Append events atomically after the current version, then apply them live."""
        before = self._state
        self._store.append(self._vm, events, expected_version=before.version)
        for event in events:
            self._apply(event)
        self._batch.extend(events)
        self._log.debug(
            "transition.applied",
            vm=self._vm,
            incarnation=self._state.incarnation,
            stream_version=self._state.version,
            command=command,
            from_state=before.runstate,
            to_state=self._state.runstate,
            events=[type(event).type_tag for event in events],
        )

    def _apply(self, event: Event) -> None:
        old = self._state
        new = fold(old, event)
        if isinstance(event, ev.QemuStarted):
            if new.qemu_version != self._model.version:
                self._model = load_model(new.qemu_version)
            self._runstate.detach()
            self._runstate = LiveRunstate(self._model, None)
            self._runstate.start(event.runstate)
        elif isinstance(event, ev.QemuUpgraded):
            self._model = load_model(event.qemu_version)
        elif new.runstate is None:
            self._runstate.exit()
        elif new.runstate != old.runstate:
            self._runstate.change(new.runstate)
        self._state = new

    def _exit(self, command: str, reason: str, detail: str = "") -> None:
        self._ports.host.stop_qemu()
        self._writer = None
        event = ev.QemuExited(incarnation=self._state.incarnation, reason=reason, detail=detail)
        self._record(command, event)

    def _autostart(self, *, value: bool) -> None:
        if self._state.autostart == value:
            return
        self._record("cont" if value else "stop", ev.AutostartChanged(autostart=value))

    def _operate(
        self, command: str, operation: str, target: str, action: Callable[[], Any]
    ) -> Any:
        """Record the intent, run the operation; on PortError record the failure, re-raise."""
        self._record(command, ev.OperationStarted(operation=operation, target=target))
        try:
            return action()
        except PortError as exc:
            self._record(command, ev.OperationFailed(operation=operation, error=exc.error))
            raise

    def _status(self, command: str, side: str, status: str, error: str = "") -> None:
        self._record(command, ev.MigrationStatusReported(side=side, status=status, error=error))

    def _stop_for_migration(self) -> None:
        """QEMU's vm_stop_force_state(finish-migrate): STOP if live, else a silent change."""
        state = self._state
        if state.runstate in self._model.live_runstates:
            flag = state.runstate == "suspended"
            self._record("migrate", ev.VmStopped(runstate="finish-migrate", was_suspended=flag))
        else:
            self._record(
                "migrate",
                ev.RunstateSet(runstate="finish-migrate", was_suspended=state.was_suspended),
            )

    def _guard(self, step: str, **facts: Any) -> None:
        """Report the step's hazards as events, or (strict) refuse a step that loses data."""
        self._report(step, self._hazards(step, **facts))

    def _hazards(self, step: str, **facts: Any) -> tuple[Hazard, ...]:
        """The step's hazards; in strict mode a data-losing one refuses the step here."""
        found = hazards_of(
            step,
            self._state,
            blocks=self._ports.memory.blocks(),
            volatile=self._ports.host.volatile,
            **facts,
        )
        losing = [hazard for hazard in found if hazard.loses_data]
        if self._strict and losing:
            self._refuse(step, rule=losing[0].rule, error=losing[0].detail, hint=losing[0].hint)
        return found

    def _report(self, step: str, found: tuple[Hazard, ...]) -> None:
        for hazard in found:
            self._record(
                step,
                ev.HazardReported(
                    rule=hazard.rule,
                    detail=hazard.detail,
                    hint=hazard.hint,
                    loses_data=hazard.loses_data,
                ),
            )

    def _check_restored_ram(self, uri: str) -> None:
        """Compare restored RAM with what was saved; a difference is recorded as data lost."""
        saved = self._state.state_file(uri)
        if saved is None or not saved.ram_digest:
            return  # saved by another VM's log: nothing to compare with
        restored = self._ports.memory.digest()
        if restored != saved.ram_digest:
            self._record(
                "migrate-incoming",
                ev.GuestDataLost(
                    detail=f"guest RAM restored from {uri} differs from the RAM that was saved",
                    hazards=tuple(version for version, _ in self._state.hazards),
                ),
            )

    def _ram_in_place(self) -> tuple[str, ...]:
        """Paths of the shared RAM files whose content the stream relies on, not holds."""
        skipped = self._skipped_blocks()
        return tuple(
            sorted(
                block.path
                for block in self._ports.memory.blocks()
                if block.name in skipped and block.path
            )
        )

    def _skipped_blocks(self) -> frozenset[str]:
        """The RAM blocks QEMU does not transfer: shared named files under x-ignore-shared."""
        if "x-ignore-shared" not in self._state.capabilities:
            return frozenset()
        return frozenset(
            block.name
            for block in self._ports.memory.blocks()
            if block.shared and block.named_file
        )

    def _switch_over(self, writer: StreamWriter) -> None:
        state = self._state
        uri = state.migration.uri if state.migration else ""
        if self._model.may_change_status("outgoing", state.outgoing_status, "device"):
            self._status("migrate", "outgoing", "device")
        devices = self._operate(
            "migrate", "devices.save", uri, lambda: self._ports.devices.save(writer)
        )
        self._record(
            "migrate", ev.DeviceStateSaved(bytes_written=devices.bytes, digest=devices.digest)
        )
        stream = self._operate("migrate", "channel.commit", uri, writer.commit)
        plan = state.migration
        assert plan is not None  # a switch-over always belongs to a started migration
        self._record(
            "migrate",
            ev.StateFileWritten(
                uri=uri,
                bytes_written=stream.bytes,
                runstate=plan.runstate,
                was_suspended=plan.was_suspended or plan.runstate == "suspended",
                mode=plan.mode,
                validated=plan.capabilities & _VALIDATED,
                qemu_version=state.qemu_version,
                digest=stream.digest,
                ram_in_place=self._ram_in_place(),
                ram_digest=self._ports.memory.digest(),
            ),
        )
        self._status("migrate", "outgoing", "completed")
        self._record(
            "migrate",
            ev.RunstateSet(runstate="postmigrate", was_suspended=self._state.was_suspended),
        )

    def _resume_target(self) -> str:
        """QEMU's vm_start: back to suspended if the guest was suspended (9.0+), else running."""
        live_suspend = "suspended" in self._model.live_runstates
        return "suspended" if self._state.was_suspended and live_suspend else "running"

    def _compensate(self, command: str, status: str, error: str) -> None:
        """A failed migration: the status fails first, then the VM is put back."""
        self._status(command, "outgoing", status, error)
        self._put_back(command)

    def _put_back(self, command: str) -> None:
        """Put the VM back where it was before the migration stopped it, as QEMU does."""
        state = self._state
        plan = state.migration
        if plan is None or state.runstate != "finish-migrate":
            return
        if plan.runstate in self._model.live_runstates:
            self._record(command, ev.VmResumed(runstate=self._resume_target()))
        elif self._model.may_change_runstate("finish-migrate", plan.runstate):
            self._record(
                command, ev.RunstateSet(runstate=plan.runstate, was_suspended=state.was_suspended)
            )
        else:
            detail = f"invalid runstate transition: 'finish-migrate' -> '{plan.runstate}'"
            self._exit(command, "abort", detail)
            raise QemuAbortPredicted(detail, tuple(self._batch))

    def _fail_incoming(self, error: str) -> None:
        """A failed load: status failed, then QEMU exits (exit-on-error is on by default)."""
        self._status("migrate-incoming", "incoming", "failed", error)
        self._exit("migrate-incoming", "incoming-failed", error)

    def _incoming_runstate(self, header: StreamHeader) -> None:
        """Where the destination ends: from the source's runstate, autostart and the flag."""
        flag = header.was_suspended or header.runstate == "suspended"
        live = self._model.live_runstates
        if header.runstate in live or header.runstate == "suspended":
            if self._state.autostart:
                target = "suspended" if flag and "suspended" in live else "running"
                self._record("migrate-incoming", ev.VmResumed(runstate=target))
            else:
                self._record(
                    "migrate-incoming", ev.RunstateSet(runstate="paused", was_suspended=flag)
                )
        else:
            self._record(
                "migrate-incoming", ev.RunstateSet(runstate=header.runstate, was_suspended=flag)
            )


def _hashable(value: object) -> object:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, set | list):
        return frozenset(value)
    return value


def _on(value: bool) -> str:  # noqa: FBT001 - QEMU's on/off spelling
    return "on" if value else "off"
