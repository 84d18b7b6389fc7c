"""The live lifecycle controller of one VM: decide, record the intent, act, record the outcome.

Every command is a trigger of the release's ``transitions`` machine
(:mod:`cprfsm._engine`).  Its condition is the model's verdict: a refusal
raises :class:`~cprfsm.IllegalTransition` and changes nothing (no event, no
executor call).  An accepted command records its intent where it runs long,
is carried out by the executor, and what QEMU reported is checked against
the model's prediction and recorded.  Where QEMU reported something else, the
machine records :class:`~cprfsm.vm_events.ModelDiverged` with both sides and
adopts QEMU's facts: QEMU is the truth about itself.
"""

from __future__ import annotations

import functools
import signal
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self

import attrs
import structlog

from cprfsm import vm_events as ev
from cprfsm._engine import Engine
from cprfsm._qemu import configuration, predict, report_of, skipped_blocks
from cprfsm.exceptions import (
    CommandFailed,
    CprFsmError,
    IllegalTransition,
    ModelDivergence,
    QemuAbortPredicted,
    UnknownNameError,
    UsageError,
)
from cprfsm.executor import (
    Command,
    MigrationSettings,
    QmpEvent,
    Report,
    Transferred,
    VmDefinition,
    ram_blocks,
)
from cprfsm.hazards import Hazard, hazards_of
from cprfsm.legality import Reason, Verdict, check
from cprfsm.lifecycle import VmState, fold, rebuild
from cprfsm.model import load_model

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from cprfsm.events import Event
    from cprfsm.executor import Executor
    from cprfsm.store import EventStore

__all__ = [
    "VirtualMachine",
]

_VERDICT_CACHE = 256
_INTERRUPTED = "interrupted: the controller stopped before the outcome was recorded"
# Commands that run long: their intent is recorded before the executor starts them.
_LONG = frozenset({"migrate", "migrate-continue", "migrate-incoming"})
# Commands after which the executor waits for the migration to settle.
_MIGRATING = _LONG | {"migrate_cancel"}
# QMP events with no lifecycle meaning of their own; left out of comparisons.
_UNCOMPARED = frozenset({"MIGRATION_PASS", "RESET"})
# Outgoing statuses during which QEMU's STOP is the switch-over into finish-migrate.
_MOVING = frozenset({"setup", "active", "pre-switchover", "device"})
# SHUTDOWN reasons QEMU gives, as the exit reasons the model records.
_SHUTDOWN_REASONS = {"host-qmp-quit": "quit", "guest-shutdown": "guest-shutdown"}


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
    """One VM's lifecycle controller over an event store and an executor.

    Every command returns the events it recorded (empty when nothing changed).
    """

    def __init__(  # noqa: PLR0913 - keyword-only settings of one VM
        self,
        vm: str,
        *,
        store: EventStore,
        executor: Executor,
        definition: VmDefinition | None = None,
        qemu: str | None = None,
        strict: bool = False,
    ) -> None:
        """Load the VM's log from ``store`` (``qemu`` is the release installed if it is new).

        With ``strict`` a step with a data-loss hazard or a predicted failure is
        refused, and a divergence from the model raises ModelDivergence once
        recorded; by default hazards are recorded (HazardReported) and the step
        goes ahead, as QEMU would.
        """
        self._vm = vm
        self._strict = strict
        self._store = store
        self._executor = executor
        self._definition = definition or VmDefinition()
        state = rebuild(store, vm, qemu=qemu)
        self._state = state
        self._model = load_model(state.qemu_version)
        self._engine = Engine(self._model, state.runstate, self)
        self._batch: list[Event] = []
        self._refusal: Verdict | None = None
        files = [block.path for block in ram_blocks(self._definition) if block.path]
        # Host facts the legality rules read; tmpfs is what the executor calls volatile.
        self._host = {
            "ram-files-on-tmpfs-or-hugetlbfs": all(executor.volatile(path) for path in files),
        }
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
        return self._engine.runstate

    @property
    def definition(self) -> VmDefinition:
        """What the next start of QEMU puts on its command line."""
        return self._definition

    def close(self) -> None:
        """Detach from the shared machine and close the executor (QEMU goes with it)."""
        self._engine.detach()
        self._executor.close()

    def __enter__(self) -> Self:
        """Use the VM in a with block; it is closed at the end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the VM."""
        self.close()

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
            config = configuration(state, self._definition, host=self._host, **arguments)
            verdict = check(config, command, model=self._model, walk=False)
            self._verdicts[key] = verdict
        return verdict

    # --- process and host -------------------------------------------------------------

    @_command
    def start(self, *, paused: bool = False, incoming: bool = False) -> None:
        """Start QEMU (``-S`` with ``paused``, ``-incoming defer`` with ``incoming``)."""
        self._trigger(
            "start",
            definition=self._definition,
            paused=paused,
            incoming=incoming,
            qemu=self._state.qemu_version,
        )

    @_command
    def quit(self) -> None:
        """Quit QEMU (QMP ``quit``)."""
        self._trigger("quit")

    @_command
    def reboot_host(self) -> None:
        """Reboot the host; a running QEMU dies with it, volatile storage is wiped."""
        self._trigger("reboot-host")

    @_command
    def upgrade_qemu(self, version: str) -> None:
        """Install another QEMU release between quit and the next start."""
        self._trigger("upgrade-qemu", version=load_model(version).version)

    # --- runstate commands ---------------------------------------------------------------

    @_command
    def cont(self) -> None:
        """QMP ``cont``: resume (into suspended if the guest was suspended when stopped)."""
        self._trigger("cont")

    @_command
    def stop(self) -> None:
        """QMP ``stop``: pause a live VM (a no-op on a stopped one)."""
        self._trigger("stop")

    @_command
    def debug_stop(self) -> None:
        """The gdbstub stops a live VM in runstate ``debug``."""
        self._trigger("debug-stop")

    @_command
    def guest_suspend(self) -> None:
        """The guest enters ACPI S3 (what guest-suspend-ram asks it to do)."""
        self._trigger("guest-suspend")

    @_command
    def system_wakeup(self) -> None:
        """QMP ``system_wakeup``: wake a suspended guest."""
        self._trigger("system_wakeup")

    @_command
    def guest_reset(self) -> None:
        """The guest (or system_reset) resets; a stopped VM lands in prelaunch."""
        self._trigger("guest-reset")

    @_command
    def guest_shutdown(self) -> None:
        """The guest powers off; QEMU exits (the default shutdown action)."""
        self._trigger("guest-shutdown")

    # --- migration set-up --------------------------------------------------------------

    @_command
    def set_parameters(
        self, *, mode: str | None = None, parameters: Mapping[str, str] | None = None
    ) -> None:
        """QMP ``migrate-set-parameters``: the mode and other parameters."""
        arguments: dict[str, Any] = dict(parameters or {})
        if mode is not None:
            arguments["mode"] = mode
        self._trigger("migrate-set-parameters", **arguments)

    @_command
    def set_capabilities(self, changes: Mapping[str, bool]) -> None:
        """QMP ``migrate-set-capabilities``: turn capabilities on or off (checked as a whole)."""
        unknown = sorted(set(changes) - set(self._model.capabilities))
        if unknown:
            context = f"QEMU {self._model.version}"
            raise UnknownNameError(
                "capability", unknown[0], self._model.capabilities, context=context
            )
        self._trigger("migrate-set-capabilities", capabilities=dict(changes))

    # --- migration ------------------------------------------------------------------------

    @_command
    def migrate(self, uri: str) -> None:
        """QMP ``migrate`` to ``uri``: save the VM in this mode, as QEMU does."""
        self._trigger("migrate", uri=uri)

    @_command
    def migrate_continue(self) -> None:
        """QMP ``migrate-continue``: leave pre-switchover and complete the migration."""
        self._trigger("migrate-continue", state="pre-switchover")

    @_command
    def migrate_cancel(self) -> None:
        """QMP ``migrate_cancel``: cancel a migration in progress (a no-op otherwise)."""
        self._trigger("migrate_cancel")

    @_command
    def migrate_incoming(self, uri: str) -> None:
        """QMP ``migrate-incoming``: load the VM from ``uri`` into this waiting QEMU."""
        self._trigger("migrate-incoming", uri=uri)

    # --- what QEMU says unasked --------------------------------------------------------------

    @_command
    def observe(self, timeout: float = 0.0) -> None:
        """Record what QEMU said unasked (another client, the guest); wait up to ``timeout``."""
        report = self._executor.observe(timeout)
        self._adopt("observe", report)

    @_command
    def adopt(self, report: Report, settings: MigrationSettings | None = None) -> None:
        """Record a report the caller took from the executor itself, as observe() does.

        ``settings`` are the migration settings QEMU holds now (QMP has no event
        for another client changing them); where they differ from the log they
        are recorded in the same append, just before the migration that starts
        in ``report`` (else after its events).
        """
        self._adopt("observe", report, settings)

    @_command
    def attach(self, settings: MigrationSettings | None = None) -> None:
        """Adopt a QEMU the executor found already running (one someone else started).

        Records the process as started in the runstate QEMU reports, then
        ``settings`` (its migration settings, where given) and its migration
        status; a QEMU the log already knows changes nothing.
        """
        if self._state.qemu_running:
            return
        report = self._executor.observe(0.0)
        if report.runstate is None:
            raise UsageError("the executor found no running QEMU to attach to")
        definition = self._definition
        self._record(
            "attach",
            ev.QemuStarted(
                incarnation=self._state.incarnation + 1,
                qemu_version=self._state.qemu_version,
                host_boot=self._state.host_boot,
                paused=report.runstate == "prelaunch",
                incoming=report.runstate == "inmigrate",
                runstate=report.runstate,
                memory=definition.memory,
                devices=definition.devices,
                aux_ram_share=definition.aux_ram_share,
            ),
        )
        # Events QEMU emitted before the runstate it reports are already in it.
        exits = tuple(fact for fact in report.facts if not isinstance(fact, QmpEvent))
        self._adopt("attach", attrs.evolve(report, facts=exits), settings)

    @_command
    def recover(self) -> None:
        """Settle an operation whose intent is in the log but whose outcome is not.

        That happens when the controller died mid-operation.  The operation is
        recorded as failed, then what the executor finds now is adopted: for
        the executors cprfsm ships, QEMU went away with the controller.
        Without an operation in flight this does nothing.
        """
        in_flight = self._state.in_flight
        if in_flight is None:
            return
        self._record("recover", ev.OperationFailed(operation=in_flight[0], error=_INTERRUPTED))
        report = self._executor.observe(0.0)
        self._record(
            "recover",
            ev.QemuObserved(
                runstate=report.runstate,
                status=report.status,
                error=report.error,
                detail=_exit_detail(report) or "no QEMU process was found after the interruption",
            ),
        )

    # --- the engine's callbacks ----------------------------------------------------------------

    def permitted(self, command: str, arguments: dict[str, Any]) -> bool:
        """The model's verdict as the trigger's condition; a predicted abort raises."""
        verdict = self._verdict(command, arguments)
        first = verdict.first
        if first is None or (first.asynchronous and not self._strict):
            _require_performed(command, self._state)
        if first is None:
            return True
        if first.aborts:
            self._log.info(
                "transition.abort-predicted", vm=self._vm, command=command, error=first.error
            )
            raise QemuAbortPredicted(first.error, ())
        if first.asynchronous and not self._strict:
            return True  # QEMU accepts it and fails later: send it, record what happens
        self._refusal = verdict
        return False

    def intend(self, command: str, arguments: dict[str, Any]) -> None:
        """Record the intent of a long command and the step's hazards, before acting."""
        hazards = self._hazards(command, arguments)
        events: list[Event] = []
        if command in _LONG:
            plan = self._state.migration
            target = str(arguments.get("uri") or (plan.uri if plan else ""))
            events.append(ev.OperationStarted(operation=command, target=target))
        events += [
            ev.HazardReported(
                rule=hazard.rule,
                detail=hazard.detail,
                hint=hazard.hint,
                loses_data=hazard.loses_data,
            )
            for hazard in hazards
        ]
        self._record(command, *events)

    def perform(self, command: str, arguments: dict[str, Any]) -> None:
        """Carry ``command`` out through the executor; record what QEMU reported."""
        if command == "upgrade-qemu":
            if arguments["version"] != self._state.qemu_version:
                self._record(command, ev.QemuUpgraded(qemu_version=arguments["version"]))
            return
        order = Command(name=command, arguments=arguments)
        volatile = self._executor.volatile
        predicted, after, operations = predict(
            self._state, self._definition, order, volatile=volatile
        )
        resting = after.incoming_status if command == "migrate-incoming" else after.outgoing_status
        if command in _MIGRATING and resting in self._model.running_statuses:
            # Where QEMU never settles, tell the executor where it will rest.
            order = Command(name=command, arguments={**arguments, "rests_in": resting})
        report = self._executor.execute(order)
        measured = any(isinstance(fact, Transferred) for fact in report.facts)
        expected = _observation(report_of(after, predicted), transfers=measured)
        observed = _observation(report, transfers=measured)
        error = report.error or (report.exit.message if report.exit else "")
        outcome = predicted if observed == expected and report.refused is None else None
        for operation in operations if outcome is None and report.refused is None else ():
            alternative, later, _ = predict(
                self._state,
                self._definition,
                order,
                volatile=volatile,
                failing=(operation, error),
            )
            if _observation(report_of(later, alternative), transfers=measured) == observed:
                outcome = alternative
                break
        if outcome is None:
            self._diverged(command, expected, observed, report)
            return
        self._record(command, *_measured(outcome, report))
        if command == "migrate-incoming":
            self._check_restored_ram(str(arguments["uri"]), report)
        self._raise_for(command, outcome)

    # --- internals -------------------------------------------------------------------------

    def _trigger(self, command: str, **arguments: Any) -> None:
        self._refusal = None
        if not self._engine.command(command, arguments):
            verdict = self._refusal or self._verdict(command, arguments)
            self._log.info(
                "transition.refused",
                vm=self._vm,
                command=command,
                runstate=self._state.runstate,
                reasons=[reason.rule for reason in verdict.reasons],
                error=verdict.error,
            )
            raise IllegalTransition(verdict)

    def _verdict(self, command: str, arguments: dict[str, Any]) -> Verdict:
        overrides: dict[str, Any] = {}
        if command == "migrate-set-parameters":
            merged = dict(self._state.parameters) | {
                k: str(v) for k, v in arguments.items() if k != "mode"
            }
            overrides = {"mode": arguments.get("mode", self._state.mode), "parameters": merged}
        elif command == "migrate-set-capabilities":
            changes: Mapping[str, bool] = arguments["capabilities"]
            on = {name for name, value in changes.items() if value}
            off = {name for name, value in changes.items() if not value}
            overrides = {"capabilities": (self._state.capabilities | on) - off}
        elif "uri" in arguments:
            overrides = {"uri": arguments["uri"]}
        return self.can(command, **overrides)

    def _record(self, command: str, *events: Event) -> None:
        """Fold, move the engine, append atomically after the current version, then commit."""
        if not events:
            return
        before = self._state
        state = before
        for event in events:
            state = fold(state, event, check_runstates=False)
            if isinstance(event, ev.QemuStarted | ev.QemuUpgraded) and (
                state.qemu_version != self._model.version
            ):
                self._model = load_model(state.qemu_version)
                self._engine.detach()
                self._engine = Engine(self._model, None, self)
            if isinstance(event, ev.QemuObserved | ev.QemuStarted):
                self._engine.force(state.runstate)
            else:
                self._engine.move(state.runstate)
        try:
            self._store.append(self._vm, events, expected_version=before.version)
        except BaseException:
            self._engine.force(before.runstate)
            raise
        self._state = state
        self._batch.extend(events)
        self._log.debug(
            "transition.applied",
            vm=self._vm,
            incarnation=state.incarnation,
            stream_version=state.version,
            command=command,
            from_state=before.runstate,
            to_state=state.runstate,
            events=[type(event).type_tag for event in events],
        )

    def _diverged(
        self, command: str, expected: tuple[str, ...], observed: tuple[str, ...], report: Report
    ) -> None:
        """Keep both sides, adopt QEMU's facts, and raise what the caller must know."""
        divergence = ev.ModelDiverged(command=command, expected=expected, observed=observed)
        self._log.warning(
            "transition.diverged",
            vm=self._vm,
            command=command,
            expected=list(expected),
            observed=list(observed),
        )
        self._record(command, divergence, *self._adopted(report))
        if self._strict:
            raise ModelDivergence(divergence)
        if report.refused is not None:
            reason = Reason(
                rule="qemu-refused",
                command=command,
                asynchronous=False,
                error=report.refused,
                source="QEMU (the model did not predict this refusal)",
                hint="QEMU refused; the divergence is recorded in the log",
            )
            raise IllegalTransition(
                Verdict(
                    qemu=self._model.version, command=command, steps=(command,), reasons=(reason,)
                )
            )

    def _adopt(
        self, command: str, report: Report, settings: MigrationSettings | None = None
    ) -> None:
        """Record facts QEMU reported unasked, each as the event it amounts to.

        An event the model forbids where the log stands is a divergence: it is
        recorded as ModelDiverged, and QEMU's account is adopted from there on.
        """
        state = self._state
        events: list[Event] = []
        pending = self._settings(state, settings) if settings is not None else []
        for fact in report.facts:
            if not isinstance(fact, QmpEvent):
                continue
            if fact.label == "MIGRATION setup":  # the settings the migration starts with
                for event in pending:
                    state = fold(state, event)
                    events.append(event)
                pending = []
            try:
                for event in _unasked(state, fact, report):
                    state = fold(state, event)
                    events.append(event)
            except CprFsmError:
                side = state.reported_status
                events.append(
                    ev.ModelDiverged(
                        command=command,
                        expected=(f"runstate {state.runstate}", f"status {side}"),
                        observed=_observation(report, transfers=False),
                    )
                )
                break  # the rest cannot be told from events: adopt QEMU's account below
        for event in pending:
            state = fold(state, event)
            events.append(event)
        events.extend(self._adopted(report, after=state))
        self._record(command, *events)

    def _settings(self, state: VmState, settings: MigrationSettings) -> list[Event]:
        """The events that bring the log's migration settings to ``settings``.

        Only what the model knows is kept: its capabilities, and its parameters
        where they differ from their defaults.
        """
        defaults = {parameter.name: parameter.default for parameter in self._model.parameters}
        parameters = tuple(
            sorted(
                (name, value)
                for name, value in settings.parameters.items()
                if name in defaults and value != defaults[name]
            )
        )
        capabilities = frozenset(settings.capabilities) & frozenset(self._model.capabilities)
        events: list[Event] = []
        if (settings.mode, parameters) != (state.mode, state.parameters):
            events.append(ev.ParametersSet(mode=settings.mode, parameters=parameters))
        if capabilities != state.capabilities:
            events.append(ev.CapabilitiesSet(capabilities=capabilities))
        return events

    def _adopted(self, report: Report, after: VmState | None = None) -> tuple[Event, ...]:
        """QEMU's account of where it is now, where it differs from ``after``."""
        state = after or self._state
        exited = report.exit
        if exited is not None or report.runstate is None:
            if state.runstate is None:
                return ()
            # An attached executor cannot see the exit status: QEMU's SHUTDOWN says why.
            shutdown = next(
                (f for f in report.facts if isinstance(f, QmpEvent) and f.name == "SHUTDOWN"),
                None,
            )
            reason = "exited"
            if exited is not None and exited.signal:
                reason = "abort" if exited.signal == signal.SIGABRT else "killed"
            if shutdown is not None and reason == "exited":
                reason = _SHUTDOWN_REASONS.get(str(shutdown.data.get("reason", "")), reason)
            return (
                ev.QemuExited(
                    incarnation=state.incarnation, reason=reason, detail=_exit_detail(report)
                ),
            )
        if (report.runstate, report.status) == (state.runstate, state.reported_status):
            return ()
        return (
            ev.QemuObserved(runstate=report.runstate, status=report.status, error=report.error),
        )

    def _raise_for(self, command: str, outcome: tuple[Event, ...]) -> None:
        """Raise what QEMU's outcome means to the caller: an abort, a failure of its command."""
        for event in outcome:
            if isinstance(event, ev.QemuExited) and event.reason == "abort":
                raise QemuAbortPredicted(event.detail, tuple(self._batch))
        for event in outcome:
            if isinstance(event, ev.OperationFailed) and event.operation == "channel.open":
                raise CommandFailed(command, event.error, tuple(self._batch))

    def _hazards(self, command: str, arguments: dict[str, Any]) -> tuple[Hazard, ...]:
        """The step's hazards; in strict mode a data-losing one refuses the step here."""
        step = {"reboot-host": "reboot_host"}.get(command, command)
        if step not in {"migrate", "reboot_host", "start"} or arguments.get("incoming"):
            return ()
        facts: dict[str, Any] = {}
        if step == "migrate":
            skipped = skipped_blocks(self._state, self._definition)
            facts = {"uri": arguments["uri"], "skipped": skipped}
        found = hazards_of(
            step,
            self._state,
            blocks=ram_blocks(self._definition),
            volatile=self._executor.volatile,
            **facts,
        )
        losing = [hazard for hazard in found if hazard.loses_data]
        if self._strict and losing:
            self._refuse(step, losing[0])
        return found

    def _refuse(self, command: str, hazard: Hazard) -> None:
        reason = Reason(
            rule=hazard.rule,
            command=command,
            asynchronous=False,
            error=hazard.detail,
            source="cprfsm.hazards",
            hint=hazard.hint,
        )
        verdict = Verdict(
            qemu=self._model.version, command=command, steps=(command,), reasons=(reason,)
        )
        raise IllegalTransition(verdict)

    def _check_restored_ram(self, uri: str, report: Report) -> None:
        """Compare restored RAM with what was saved; a difference is recorded as data lost."""
        saved = self._state.state_file(uri)
        if saved is None or not saved.ram_digest or not report.ram_digest:
            return  # saved by another VM's log, or an executor that cannot digest RAM
        if self._state.incoming_status != "completed":
            return
        if report.ram_digest != saved.ram_digest:
            self._record(
                "migrate-incoming",
                ev.GuestDataLost(
                    detail=f"guest RAM restored from {uri} differs from the RAM that was saved",
                    hazards=tuple(version for version, _ in self._state.hazards),
                ),
            )


def _require_performed(command: str, state: VmState) -> None:
    """Refuse, as a usage error, what the machine cannot perform yet."""
    if command == "migrate" and (
        state.mode == "cpr-transfer" or "background-snapshot" in state.capabilities
    ):
        msg = (
            "the lifecycle machine performs normal and cpr-reboot saves to a URI; "
            "cpr-transfer and background snapshots are not performed yet (use check())"
        )
        raise UsageError(msg)


def _observation(report: Report, *, transfers: bool) -> tuple[str, ...]:
    """What is compared between the model and QEMU: events, runstate, status and its error.

    With ``transfers`` (the executor measures them) the operations that moved data count too.
    """
    labels = [
        fact.label if isinstance(fact, QmpEvent) else fact.operation
        for fact in report.facts
        if (isinstance(fact, QmpEvent) and fact.name not in _UNCOMPARED)
        or (transfers and isinstance(fact, Transferred))
    ]
    if report.refused is not None:
        labels.append(f"refused {report.refused}")
    labels.append(f"runstate {report.runstate or 'none (no process)'}")
    labels.append(f"status {report.status}")
    if report.status == "failed":  # a cancelled migration may carry a channel error too
        labels.append(f"error {report.error}")
    return tuple(labels)


def _measured(events: tuple[Event, ...], report: Report) -> tuple[Event, ...]:
    """The predicted events with what the executor measured: bytes, digests, what a reboot lost."""
    transfers = [fact for fact in report.facts if isinstance(fact, Transferred)]
    result: list[Event] = []
    for event in events:
        if isinstance(
            event, ev.RamSaved | ev.DeviceStateSaved | ev.RamLoaded | ev.DeviceStateLoaded
        ):
            measured = _take(transfers, _OPERATION[type(event)])
            if measured is None:
                continue  # the executor does not measure transfers: nothing to record
            result.append(_with_transfer(event, measured))
        elif isinstance(event, ev.StateFileWritten):
            measured = _take(transfers, "stream.commit")
            result.append(_with_transfer(event, measured, ram_digest=report.ram_digest))
        elif isinstance(event, ev.HostRebooted):
            result.append(ev.HostRebooted(host_boot=event.host_boot, lost=report.lost))
        else:
            result.append(event)
    return tuple(result)


_OPERATION: dict[type[Any], str] = {
    ev.RamSaved: "ram.save",
    ev.DeviceStateSaved: "devices.save",
    ev.RamLoaded: "ram.load",
    ev.DeviceStateLoaded: "devices.load",
}


def _take(transfers: list[Transferred], operation: str) -> Transferred | None:
    for index, transfer in enumerate(transfers):
        if transfer.operation == operation:
            return transfers.pop(index)
    return None


def _with_transfer(event: Any, measured: Transferred | None, **extra: Any) -> Any:
    changes: dict[str, Any] = dict(extra)
    if measured is not None:
        moved = "bytes_read" if hasattr(event, "bytes_read") else "bytes_written"
        changes |= {moved: measured.bytes, "digest": measured.digest}
        if isinstance(event, ev.RamSaved):
            changes["written"] = measured.blocks or event.written
        if isinstance(event, ev.RamLoaded):
            changes["loaded"] = measured.blocks or event.loaded
    return attrs.evolve(event, **changes)


def _unasked(state: VmState, fact: QmpEvent, report: Report) -> tuple[Event, ...]:  # noqa: PLR0911
    """The events an unasked QMP event amounts to (none for one without lifecycle meaning)."""
    name = fact.name
    if name == "STOP":
        runstate = (
            report.runstate if report.runstate not in {None, "running", "suspended"} else "paused"
        )
        if state.outgoing_status in _MOVING or runstate == "postmigrate":
            # QEMU stops for the switch-over into finish-migrate, and reaches postmigrate
            # only from there; without the events capability the STOP is all it emits.
            runstate = "finish-migrate"
        return (
            ev.VmStopped(
                runstate=runstate or "paused", was_suspended=state.runstate == "suspended"
            ),
        )
    if name == "RESUME":
        return (ev.VmResumed(runstate="suspended" if state.was_suspended else "running"),)
    if name == "SUSPEND":
        return (ev.GuestSuspended(),)
    if name == "WAKEUP":
        return (ev.GuestWokeUp(),) if state.runstate == "suspended" else ()
    if name == "GUEST_PANICKED":
        return (ev.RunstateSet(runstate="guest-panicked", was_suspended=state.was_suspended),)
    if name == "MIGRATION":
        return _migration(state, str(fact.data.get("status", "")), report)
    return ()


def _migration(state: VmState, status: str, report: Report) -> tuple[Event, ...]:
    """The events a ``MIGRATION`` event with ``status`` amounts to."""
    done = state.incoming_status in {"completed", "failed"}
    side = "incoming" if state.reported_side == "incoming" and not done else "outgoing"
    if status == "setup" and side == "outgoing":
        started = ev.MigrationStarted(
            uri="",
            mode=state.mode,
            capabilities=state.capabilities,
            runstate=state.runstate or "",
            was_suspended=state.was_suspended,
        )
        return (started,)
    if status == "setup":
        return (ev.IncomingStarted(uri=""),)
    error = report.error if status == "failed" else ""
    reported = ev.MigrationStatusReported(side=side, status=status, error=error)
    if side == "outgoing" and status == "completed" and state.runstate == "finish-migrate":
        # QEMU sets postmigrate as it completes and emits no event for it.
        return (
            reported,
            ev.RunstateSet(runstate="postmigrate", was_suspended=state.was_suspended),
        )
    return (reported,)


def _exit_detail(report: Report) -> str:
    exited = report.exit
    if exited is None:
        return ""
    how = f"signal {exited.signal}" if exited.signal else f"exit code {exited.code}"
    return f"{how}: {exited.message}" if exited.message else how


def _hashable(value: object) -> object:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, set | list):
        return frozenset(value)
    return value
