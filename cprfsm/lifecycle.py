"""One VM's faithful state, the fold that rebuilds it from events, and its five phases.

:class:`VmState` holds what QEMU (and the host) really hold; :attr:`VmState.phase`
projects it onto the card's five lifecycle phases.  :func:`replay` folds
recorded events into a state through a table compiled from the model; it never
goes through ``transitions``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Final

import attrs

from cprfsm import vm_events as ev
from cprfsm.exceptions import LogMismatchError, StoreError
from cprfsm.model import load_model

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cprfsm.events import Event
    from cprfsm.model import QemuModel
    from cprfsm.store import EventStore

__all__ = [
    "PHASES",
    "VmState",
    "phase_diagram",
    "phase_of",
    "rebuild",
    "replay",
]

#: The card's five lifecycle phases, the projection of the faithful state.
PHASES: Final = ("running", "suspended", "stopped", "saved", "incoming")


# Statuses a migration rests in: the command that led there has its outcome.
_SETTLED = frozenset({"completed", "failed", "cancelled", "pre-switchover", "colo"})


@attrs.frozen(kw_only=True)
class VmState:
    """What QEMU and the host hold for one VM, after ``version`` events."""

    vm: str
    version: int = 0
    qemu_version: str
    incarnation: int = 0
    host_boot: int = 1
    runstate: str | None = None
    was_suspended: bool = False
    autostart: bool = True
    incoming: str = "none"
    outgoing_status: str = "none"
    incoming_status: str = "none"
    # query-migrate's error-desc: the error of the last failed migration of this process.
    migration_error: str = ""
    mode: str = "normal"
    capabilities: frozenset[str] = frozenset()
    parameters: tuple[tuple[str, str], ...] = ()
    memory: str = "ram"
    devices: tuple[str, ...] = ()
    aux_ram_share: bool = False
    migration: ev.MigrationStarted | None = None
    incoming_uri: str | None = None
    state_files: tuple[ev.StateFileWritten, ...] = ()
    current_save: str | None = None
    in_flight: tuple[str, str] | None = None
    last_exit: str = ""
    # (version, rule) of data-loss hazards reported since the last save began.
    hazards: tuple[tuple[int, str], ...] = ()

    @property
    def qemu_running(self) -> bool:
        """Whether a QEMU process exists."""
        return self.runstate is not None

    @property
    def reported_side(self) -> str:
        """The migration ``query-migrate`` reports: the incoming one until an outgoing starts."""
        if self.incoming != "none" and self.outgoing_status == "none":
            return "incoming"
        return "outgoing"

    @property
    def reported_status(self) -> str:
        """The status ``query-migrate`` reports (see :attr:`reported_side`)."""
        if self.reported_side == "incoming":
            return self.incoming_status
        return self.outgoing_status

    @property
    def phase(self) -> str:
        """The lifecycle phase: running, suspended, stopped, saved or incoming."""
        if self.runstate is None:
            return "saved" if self.current_save is not None else "stopped"
        return phase_of(self.runstate)

    def state_file(self, uri: str) -> ev.StateFileWritten | None:
        """The fact that a complete stream exists at ``uri``, if one does."""
        return next((f for f in self.state_files if f.uri == uri), None)

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-ready dict (with its phase); :meth:`from_json` reads it back."""
        data = attrs.asdict(self, value_serializer=_jsonable)
        data["phase"] = self.phase
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmState:
        """The state :meth:`to_json` wrote (a snapshot); StoreError if it is not one."""
        try:
            fields = {k: v for k, v in data.items() if k != "phase"}
            migration = fields.get("migration")
            return cls(
                **{
                    **fields,
                    "capabilities": frozenset(fields["capabilities"]),
                    "parameters": tuple(tuple(pair) for pair in fields["parameters"]),
                    "devices": tuple(fields["devices"]),
                    "migration": None
                    if migration is None
                    else ev.MigrationStarted(
                        **{**migration, "capabilities": frozenset(migration["capabilities"])}
                    ),
                    "state_files": tuple(
                        ev.StateFileWritten(
                            **{
                                **f,
                                "validated": frozenset(f["validated"]),
                                "ram_in_place": tuple(f["ram_in_place"]),
                            }
                        )
                        for f in fields["state_files"]
                    ),
                    "in_flight": None
                    if fields["in_flight"] is None
                    else tuple(fields["in_flight"]),
                    "hazards": tuple(tuple(pair) for pair in fields["hazards"]),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"snapshot of {data.get('vm')!r} is not a cprfsm VM state ({exc}); "
                "delete the snapshot and replay the full log"
            ) from None


def phase_of(runstate: str) -> str:
    """The phase of a QEMU process in ``runstate``."""
    if runstate == "inmigrate":
        return "incoming"
    if runstate == "postmigrate":
        return "saved"
    if runstate in {"running", "suspended"}:
        return runstate
    return "stopped"


def phase_diagram(qemu: str | None = None) -> str:
    """Mermaid source of the five phases and the moves between them in one release.

    Phase moves come from the release's runstate table, plus the process-level
    ones: starting QEMU (running, stopped with -S, incoming with -incoming) and
    quitting it (saved if a save is current, else stopped).
    """
    model = load_model(qemu)
    edges = {
        (phase_of(old), phase_of(new))
        for old, new in model.runstate_transitions
        if phase_of(old) != phase_of(new)
    }
    lines = [f"%% QEMU {model.version}", "stateDiagram-v2"]
    lines += [f"    {old} --> {new}" for old, new in sorted(edges)]
    lines += [
        "    [*] --> running: start",
        "    [*] --> stopped: start -S",
        "    [*] --> incoming: start -incoming defer",
        "    saved --> [*]: quit",
        "    stopped --> [*]: quit",
    ]
    return "\n".join(lines)


def _jsonable(_: object, __: object, value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def replay(vm: str, events: Iterable[Event], *, qemu: str | None = None) -> VmState:
    """Fold ``events`` (in order) into the state of ``vm``; ``qemu`` is the installed release."""
    return _fold_all(initial_state(vm, qemu), events)


def rebuild(
    store: EventStore, vm: str, *, at: int | None = None, qemu: str | None = None
) -> VmState:
    """The state of ``vm`` after event ``at`` (default: all): latest snapshot, then the tail."""
    snapshot = store.load_snapshot(vm, at_most=at)
    state = VmState.from_json(snapshot.state) if snapshot else initial_state(vm, qemu)
    tail = store.read(vm, first=state.version + 1, last=at)
    return _fold_all(state, (recorded.event for recorded in tail))


def initial_state(vm: str, qemu: str | None = None) -> VmState:
    """The state of a VM before any event: no QEMU process, nothing saved."""
    return VmState(vm=vm, qemu_version=load_model(qemu).version)


def fold(state: VmState, event: Event, *, check_runstates: bool = True) -> VmState:
    """The state after one more event; LogMismatchError if the model forbids it.

    ``check_runstates=False`` leaves runstate changes unchecked, for a caller that
    moves them through the live transitions machine, which checks them itself.
    """
    return _fold_all(state, (event,), check_runstates=check_runstates)


_FIELDS = tuple(field.name for field in attrs.fields(VmState))


class _Draft:
    """A mutable copy of a VmState: events fold into it, and it is frozen once at the end."""

    __slots__ = (*_FIELDS, "check_runstates")

    def __init__(self, state: VmState, *, check_runstates: bool = True) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(state, name))
        self.check_runstates = check_runstates

    def freeze(self) -> VmState:
        return VmState(**{name: getattr(self, name) for name in _FIELDS})


def _fold_all(state: VmState, events: Iterable[Event], *, check_runstates: bool = True) -> VmState:
    draft: Any = _Draft(state, check_runstates=check_runstates)
    for event in events:
        handler = _FOLD.get(type(event))
        if handler is None:
            raise LogMismatchError(
                f"event {type(event).__name__} is not a lifecycle event of cprfsm"
            )
        handler(draft, event)
        draft.version += 1
    result: VmState = draft.freeze()
    return result


@functools.cache
def _model(version: str) -> QemuModel:
    return load_model(version)


def _to(draft: Any, runstate: str, event: Event) -> None:
    """Move the draft to ``runstate`` if the release's compiled table allows it."""
    old = draft.runstate
    if old is None:
        raise LogMismatchError(
            f"event {draft.version + 1} ({type(event).__name__}) needs a QEMU process, "
            "but none runs at that point of the log"
        )
    if (
        old != runstate
        and draft.check_runstates
        and not _model(draft.qemu_version).may_change_runstate(old, runstate)
    ):
        raise LogMismatchError(
            f"event {draft.version + 1} ({type(event).__name__}) changes the runstate "
            f"{old} -> {runstate}, which QEMU {draft.qemu_version} forbids"
        )
    draft.runstate = runstate


def _started(d: Any, e: ev.QemuStarted) -> None:
    if d.runstate is not None:
        raise LogMismatchError(
            f"event {d.version + 1} (QemuStarted) starts QEMU incarnation {e.incarnation}, "
            f"but incarnation {d.incarnation} still runs at that point of the log"
        )
    d.qemu_version = e.qemu_version
    d.incarnation = e.incarnation
    d.host_boot = e.host_boot
    d.runstate = e.runstate
    d.was_suspended = False
    d.autostart = not e.paused
    d.incoming = "deferred" if e.incoming else "none"
    d.outgoing_status = d.incoming_status = "none"
    d.migration_error = ""
    d.mode = "normal"
    d.capabilities = frozenset()
    d.parameters = ()
    d.memory = e.memory
    d.devices = e.devices
    d.aux_ram_share = e.aux_ram_share
    d.migration = d.incoming_uri = d.in_flight = None
    if not e.incoming:
        d.current_save = None


def _exited(d: Any, e: ev.QemuExited) -> None:
    d.runstate = d.migration = d.in_flight = None
    d.incoming = d.outgoing_status = d.incoming_status = "none"
    d.migration_error = ""
    d.last_exit = e.reason


def _rebooted(d: Any, e: ev.HostRebooted) -> None:
    lost = set(e.lost)
    d.host_boot = e.host_boot
    d.state_files = tuple(f for f in d.state_files if f.uri not in lost)
    if d.current_save in lost:
        d.current_save = None


def _stopped(d: Any, e: ev.VmStopped | ev.RunstateSet) -> None:
    _to(d, e.runstate, e)
    d.was_suspended = e.was_suspended


def _resumed(d: Any, e: ev.VmResumed) -> None:
    _to(d, e.runstate, e)
    d.was_suspended = False
    d.current_save = None


def _suspended(d: Any, e: ev.GuestSuspended) -> None:
    _to(d, "suspended", e)
    d.current_save = None


def _woke_up(d: Any, e: ev.GuestWokeUp) -> None:
    _to(d, "running", e)


def _reset(d: Any, e: ev.GuestReset) -> None:
    _to(d, e.runstate, e)
    d.was_suspended = False


def _autostart(d: Any, e: ev.AutostartChanged) -> None:
    d.autostart = e.autostart


def _parameters(d: Any, e: ev.ParametersSet) -> None:
    d.mode = e.mode
    d.parameters = e.parameters


def _capabilities(d: Any, e: ev.CapabilitiesSet) -> None:
    d.capabilities = e.capabilities


def _migration_started(d: Any, e: ev.MigrationStarted) -> None:
    d.migration = e
    d.outgoing_status = "setup"
    d.migration_error = ""
    if d.in_flight is None or d.in_flight[0] != "migrate":
        d.hazards = ()  # a new save: earlier hazards were about the earlier save


def _incoming_started(d: Any, e: ev.IncomingStarted) -> None:
    d.incoming = "started"
    d.incoming_status = "setup"
    d.migration_error = ""
    d.incoming_uri = e.uri


def _status(d: Any, e: ev.MigrationStatusReported) -> None:
    old = d.outgoing_status if e.side == "outgoing" else d.incoming_status
    if not _model(d.qemu_version).may_change_status(e.side, old, e.status):
        raise LogMismatchError(
            f"event {d.version + 1} moves the {e.side} migration status {old} -> {e.status}, "
            f"which QEMU {d.qemu_version} never does"
        )
    if e.side == "outgoing":
        d.outgoing_status = e.status
    else:
        d.incoming_status = e.status
    if e.status == "failed":
        d.migration_error = e.error
    if e.status in _SETTLED:
        d.in_flight = None


def _operation_started(d: Any, e: ev.OperationStarted) -> None:
    d.in_flight = (e.operation, e.target)
    if e.operation == "migrate":
        d.hazards = ()  # a new save: earlier hazards were about the earlier save


def _written(d: Any, e: ev.StateFileWritten) -> None:
    d.state_files = (*(f for f in d.state_files if f.uri != e.uri), e)
    d.current_save = e.uri
    d.in_flight = None


def _observed(d: Any, e: ev.QemuObserved) -> None:
    """QEMU's account wins, whatever the table says: it is the truth about itself."""
    d.in_flight = None
    if e.runstate is None:
        if d.runstate is not None:
            _exited(d, ev.QemuExited(incarnation=d.incarnation, reason="gone", detail=e.detail))
        return
    if d.runstate is None:
        raise LogMismatchError(
            f"event {d.version + 1} (QemuObserved) reports a QEMU process, "
            "but none was started at that point of the log"
        )
    d.runstate = e.runstate
    d.migration_error = e.error
    if d.incoming != "none" and d.outgoing_status == "none":
        d.incoming_status = e.status
    else:
        d.outgoing_status = e.status


def _upgraded(d: Any, e: ev.QemuUpgraded) -> None:
    d.qemu_version = e.qemu_version


def _outcome(d: Any, _: Event) -> None:
    d.in_flight = None


def _failed(d: Any, e: ev.OperationFailed) -> None:
    d.in_flight = None
    if e.operation == "channel.open" and d.incoming == "started" and d.incoming_status == "setup":
        d.incoming = "wedged"  # QEMU stays in setup and refuses another migrate-incoming


def _hazard(d: Any, e: ev.HazardReported) -> None:
    if e.loses_data:
        d.hazards = (*d.hazards, (d.version + 1, e.rule))


def _no_change(_: Any, __: Event) -> None:
    pass


_FOLD: dict[type[Any], Callable[[Any, Any], None]] = {
    ev.QemuStarted: _started,
    ev.QemuExited: _exited,
    ev.QemuUpgraded: _upgraded,
    ev.HostRebooted: _rebooted,
    ev.VmStopped: _stopped,
    ev.VmResumed: _resumed,
    ev.RunstateSet: _stopped,
    ev.GuestSuspended: _suspended,
    ev.GuestWokeUp: _woke_up,
    ev.GuestReset: _reset,
    ev.AutostartChanged: _autostart,
    ev.ParametersSet: _parameters,
    ev.CapabilitiesSet: _capabilities,
    ev.MigrationStarted: _migration_started,
    ev.IncomingStarted: _incoming_started,
    ev.MigrationStatusReported: _status,
    ev.OperationStarted: _operation_started,
    ev.OperationFailed: _failed,
    ev.DeviceStateSaved: _outcome,
    ev.RamSaved: _outcome,
    ev.StateFileWritten: _written,
    ev.DeviceStateLoaded: _outcome,
    ev.RamLoaded: _outcome,
    ev.HazardReported: _hazard,
    ev.GuestDataLost: _no_change,
    ev.ModelDiverged: _no_change,
    ev.QemuObserved: _observed,
}
