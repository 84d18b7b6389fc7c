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
from cprfsm.exceptions import StoreError
from cprfsm.model import load_model

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cprfsm.events import Event
    from cprfsm.store import EventStore

__all__ = ["PHASES", "LogMismatchError", "StateFile", "VmState", "rebuild", "replay"]

#: The card's five lifecycle phases, the projection of the faithful state.
PHASES: Final = ("running", "suspended", "stopped", "saved", "incoming")


class LogMismatchError(StoreError):
    """An event log asks for something the model forbids: it was not written by this model."""


@attrs.frozen(kw_only=True)
class StateFile:
    """A complete migration stream that outlives the QEMU process that wrote it."""

    uri: str
    bytes: int
    runstate: str
    was_suspended: bool
    mode: str
    validated: frozenset[str]
    qemu_version: str
    digest: str
    ram_in_place: tuple[str, ...] = ()


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
    mode: str = "normal"
    capabilities: frozenset[str] = frozenset()
    parameters: tuple[tuple[str, str], ...] = ()
    memory: str = "ram"
    devices: tuple[str, ...] = ()
    aux_ram_share: bool = False
    migration: ev.MigrationStarted | None = None
    incoming_uri: str | None = None
    state_files: tuple[StateFile, ...] = ()
    current_save: str | None = None
    in_flight: tuple[str, str] | None = None
    last_exit: str = ""

    @property
    def qemu_running(self) -> bool:
        """Whether a QEMU process exists."""
        return self.runstate is not None

    @property
    def phase(self) -> str:
        """The lifecycle phase: running, suspended, stopped, saved or incoming."""
        if self.runstate is None:
            return "saved" if self.current_save is not None else "stopped"
        if self.runstate == "inmigrate":
            return "incoming"
        if self.runstate == "postmigrate":
            return "saved"
        if self.runstate in {"running", "suspended"}:
            return self.runstate
        return "stopped"

    def state_file(self, uri: str) -> StateFile | None:
        """The complete stream at ``uri``, if one exists."""
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
                        StateFile(
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
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"snapshot of {data.get('vm')!r} is not a cprfsm VM state ({exc}); "
                "delete the snapshot and replay the full log"
            ) from None


def _jsonable(_: object, __: object, value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def replay(vm: str, events: Iterable[Event], *, qemu: str | None = None) -> VmState:
    """Fold ``events`` (in order) into the state of ``vm``; ``qemu`` is the installed release."""
    state = initial_state(vm, qemu)
    for event in events:
        state = fold(state, event)
    return state


def rebuild(
    store: EventStore, vm: str, *, at: int | None = None, qemu: str | None = None
) -> VmState:
    """The state of ``vm`` after event ``at`` (default: all): latest snapshot, then the tail."""
    snapshot = store.load_snapshot(vm, at_most=at)
    state = VmState.from_json(snapshot.state) if snapshot else initial_state(vm, qemu)
    for recorded in store.read(vm, first=state.version + 1, last=at):
        state = fold(state, recorded.event)
    return state


def initial_state(vm: str, qemu: str | None = None) -> VmState:
    """The state of a VM before any event: no QEMU process, nothing saved."""
    return VmState(vm=vm, qemu_version=load_model(qemu).version)


def fold(state: VmState, event: Event) -> VmState:
    """The state after one more event; LogMismatchError if the model forbids it."""
    handler = _FOLD.get(type(event))
    if handler is None:
        raise LogMismatchError(f"event {type(event).__name__} is not a lifecycle event of cprfsm")
    return attrs.evolve(handler(state, event), version=state.version + 1)


@functools.cache
def _table(version: str) -> frozenset[tuple[str, str]]:
    return load_model(version).runstate_transitions


def _to(state: VmState, runstate: str, event: Event) -> str:
    """Check ``state.runstate -> runstate`` against the compiled table of the release."""
    old = state.runstate
    if old is None:
        raise LogMismatchError(
            f"event {state.version + 1} ({type(event).__name__}) needs a QEMU process, "
            "but none runs at that point of the log"
        )
    if old != runstate and (old, runstate) not in _table(state.qemu_version):
        raise LogMismatchError(
            f"event {state.version + 1} ({type(event).__name__}) changes the runstate "
            f"{old} -> {runstate}, which QEMU {state.qemu_version} forbids"
        )
    return runstate


def _started(state: VmState, e: ev.QemuStarted) -> VmState:
    return attrs.evolve(
        state,
        qemu_version=e.qemu_version,
        incarnation=e.incarnation,
        host_boot=e.host_boot,
        runstate=e.runstate,
        was_suspended=False,
        autostart=not e.paused,
        incoming="deferred" if e.incoming else "none",
        outgoing_status="none",
        incoming_status="none",
        mode="normal",
        capabilities=frozenset(),
        parameters=(),
        memory=e.memory,
        devices=e.devices,
        aux_ram_share=e.aux_ram_share,
        migration=None,
        incoming_uri=None,
        current_save=state.current_save if e.incoming else None,
        in_flight=None,
    )


def _exited(state: VmState, e: ev.QemuExited) -> VmState:
    return attrs.evolve(
        state,
        runstate=None,
        incoming="none",
        outgoing_status="none",
        incoming_status="none",
        migration=None,
        in_flight=None,
        last_exit=e.reason,
    )


def _rebooted(state: VmState, e: ev.HostRebooted) -> VmState:
    lost = set(e.lost)
    files = tuple(f for f in state.state_files if f.uri not in lost)
    current = state.current_save if state.current_save not in lost else None
    return attrs.evolve(state, host_boot=e.host_boot, state_files=files, current_save=current)


def _stopped(state: VmState, e: ev.VmStopped) -> VmState:
    return attrs.evolve(state, runstate=_to(state, e.runstate, e), was_suspended=e.was_suspended)


def _resumed(state: VmState, e: ev.VmResumed) -> VmState:
    return attrs.evolve(
        state, runstate=_to(state, e.runstate, e), was_suspended=False, current_save=None
    )


def _runstate_set(state: VmState, e: ev.RunstateSet) -> VmState:
    return attrs.evolve(state, runstate=_to(state, e.runstate, e), was_suspended=e.was_suspended)


def _migration_started(state: VmState, e: ev.MigrationStarted) -> VmState:
    return attrs.evolve(state, migration=e, outgoing_status="setup")


def _status(state: VmState, e: ev.MigrationStatusReported) -> VmState:
    if e.side == "outgoing":
        return attrs.evolve(state, outgoing_status=e.status)
    return attrs.evolve(state, incoming_status=e.status)


def _written(state: VmState, e: ev.StateFileWritten) -> VmState:
    written = StateFile(
        uri=e.uri,
        bytes=e.bytes_written,
        runstate=e.runstate,
        was_suspended=e.was_suspended,
        mode=e.mode,
        validated=e.validated,
        qemu_version=e.qemu_version,
        digest=e.digest,
        ram_in_place=e.ram_in_place,
    )
    others = tuple(f for f in state.state_files if f.uri != e.uri)
    return attrs.evolve(state, state_files=(*others, written), current_save=e.uri, in_flight=None)


def _outcome(state: VmState, _: Event) -> VmState:
    return attrs.evolve(state, in_flight=None)


_FOLD: dict[type[Any], Callable[[VmState, Any], VmState]] = {
    ev.QemuStarted: _started,
    ev.QemuExited: _exited,
    ev.QemuUpgraded: lambda s, e: attrs.evolve(s, qemu_version=e.qemu_version),
    ev.HostRebooted: _rebooted,
    ev.VmStopped: _stopped,
    ev.VmResumed: _resumed,
    ev.RunstateSet: _runstate_set,
    ev.GuestSuspended: lambda s, e: attrs.evolve(
        s, runstate=_to(s, "suspended", e), current_save=None
    ),
    ev.GuestWokeUp: lambda s, e: attrs.evolve(s, runstate=_to(s, "running", e)),
    ev.GuestReset: lambda s, e: attrs.evolve(
        s, runstate=_to(s, e.runstate, e), was_suspended=False
    ),
    ev.AutostartChanged: lambda s, e: attrs.evolve(s, autostart=e.autostart),
    ev.ParametersSet: lambda s, e: attrs.evolve(s, mode=e.mode, parameters=e.parameters),
    ev.CapabilitiesSet: lambda s, e: attrs.evolve(s, capabilities=e.capabilities),
    ev.MigrationStarted: _migration_started,
    ev.IncomingStarted: lambda s, e: attrs.evolve(
        s, incoming="started", incoming_status="setup", incoming_uri=e.uri
    ),
    ev.MigrationStatusReported: _status,
    ev.OperationStarted: lambda s, e: attrs.evolve(s, in_flight=(e.operation, e.target)),
    ev.OperationFailed: _outcome,
    ev.GuestDataAtRisk: lambda s, _: s,
    ev.DeviceStateSaved: _outcome,
    ev.RamSaved: _outcome,
    ev.StateFileWritten: _written,
    ev.DeviceStateLoaded: _outcome,
    ev.RamLoaded: _outcome,
}
