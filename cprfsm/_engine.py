"""The lifecycle machine's engine: one ``transitions`` machine per QEMU release.

Its states are QEMU's runstates plus ``absent`` (no QEMU process).  Two kinds
of trigger drive it:

- every command of the model (``cont``, ``migrate``, ``start``...) is a trigger
  whose condition is the model's legality verdict, whose ``before`` callback
  records the intent and whose ``after`` callback performs the command through
  the executor and records the outcome;
- every runstate change QEMU's table allows is a trigger ``to:<runstate>``,
  fired as outcome events arrive, so a change the table forbids cannot happen.

This is the only module that imports ``transitions``; nothing it builds leaves
cprfsm.  One Machine per release is shared by every live VM of that release
(a VM costs one ``add_model``) and a VM detaches when it is closed or collected.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from transitions import EventData, Machine, MachineError

from cprfsm.model import COMMANDS

if TYPE_CHECKING:
    from cprfsm.model import QemuModel

ABSENT = "absent"
_TO = "to:"
_STARTS = ("prelaunch", "inmigrate", "running")


class RunstateRefusedError(Exception):
    """``transitions`` refused a runstate change: QEMU's table forbids it."""


class Controller(Protocol):
    """What the engine calls back: the VM whose commands it triggers."""

    def permitted(self, command: str, arguments: dict[str, Any]) -> bool:
        """The model's verdict on ``command`` now (False: refused, the verdict is kept)."""

    def intend(self, command: str, arguments: dict[str, Any]) -> None:
        """Record the intent of ``command`` before it is performed."""

    def perform(self, command: str, arguments: dict[str, Any]) -> None:
        """Perform ``command`` through the executor and record its outcome."""


class _Subject:
    """The object ``transitions`` drives; it holds its VM weakly, so the VM can be collected."""

    state: str

    def __init__(self, controller: Controller) -> None:
        self._controller = weakref.ref(controller)

    def _live(self) -> Controller:
        controller = self._controller()
        if controller is None:  # pragma: no cover - a collected VM has detached already
            raise RunstateRefusedError("the VM of this machine was garbage-collected")
        return controller

    def permitted(self, event: EventData) -> bool:
        return self._live().permitted(event.event.name, event.kwargs)

    def intend(self, event: EventData) -> None:
        self._live().intend(event.event.name, event.kwargs)

    def perform(self, event: EventData) -> None:
        self._live().perform(event.event.name, event.kwargs)


class Engine:
    """One VM's seat in the shared machine of its release."""

    def __init__(self, model: QemuModel, runstate: str | None, controller: Controller) -> None:
        """Attach a subject for ``controller`` to the shared Machine of ``model``'s release."""
        self._machine = machine_of(model)
        self._subject = _Subject(controller)
        self._machine.add_model(self._subject, initial=runstate or ABSENT)
        self._detach = weakref.finalize(controller, _remove, self._machine, self._subject)

    @property
    def runstate(self) -> str | None:
        """The current runstate, or None without a QEMU process."""
        state = self._subject.state
        return None if state == ABSENT else state

    def command(self, command: str, arguments: dict[str, Any]) -> bool:
        """Trigger ``command``: False when its condition (the verdict) refused it."""
        result: bool = self._machine.events[command].trigger(self._subject, **arguments)
        return result

    def move(self, runstate: str | None) -> None:
        """Change the runstate as QEMU reports it; the table must allow the change."""
        current = self._subject.state
        target = runstate or ABSENT
        if target == current:
            return
        trigger = _TO + target
        try:
            self._machine.events[trigger].trigger(self._subject)
        except (MachineError, KeyError) as exc:
            message = f"{current} -> {target}"
            raise RunstateRefusedError(message) from exc

    def force(self, runstate: str | None) -> None:
        """Adopt a runstate QEMU reported, whatever the table says (QEMU is the truth)."""
        self._machine.set_state(runstate or ABSENT, model=self._subject)

    def detach(self) -> None:
        """Release the shared Machine's reference to this VM (idempotent)."""
        self._detach()


def _remove(machine: Machine, subject: _Subject) -> None:
    machine.remove_model(subject)


@functools.cache
def machine_of(model: QemuModel) -> Machine:
    """The shared machine of ``model``'s release (built once per release)."""
    states = [ABSENT, *model.runstates]
    table = [
        {"trigger": _TO + new, "source": old, "dest": new}
        for old, new in sorted(model.runstate_transitions)
    ]
    starts = [{"trigger": _TO + state, "source": ABSENT, "dest": state} for state in _STARTS]
    exits = [{"trigger": _TO + ABSENT, "source": list(model.runstates), "dest": ABSENT}]
    commands = [
        {
            "trigger": command,
            "source": "*",
            "dest": None,
            "conditions": "permitted",
            "before": "intend",
            "after": "perform",
        }
        for command in COMMANDS
    ]
    return Machine(
        model=None,
        states=states,
        transitions=[*table, *starts, *exits, *commands],
        initial=ABSENT,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        send_event=True,
    )


def trigger_table(model: QemuModel) -> dict[str, int]:
    """How many triggers, conditions and callbacks the machine of ``model`` has."""
    machine = machine_of(model)
    counts = {"command triggers": 0, "runstate triggers": 0, "conditions": 0, "callbacks": 0}
    for name, event in machine.events.items():
        kind = "runstate triggers" if name.startswith(_TO) else "command triggers"
        counts[kind] += 1
        for transitions in event.transitions.values():
            for transition in transitions:
                counts["conditions"] += len(transition.conditions)
                counts["callbacks"] += len(transition.before) + len(transition.after)
    return counts
