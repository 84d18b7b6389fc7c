"""The live runstate machine, built with ``transitions`` from a release's runstate table.

This is the only module that imports ``transitions``; nothing it builds leaves
cprfsm.  One Machine per QEMU release is shared by every live VM of that
release, so a VM costs one ``add_model``, not one Machine.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from transitions import Machine, MachineError

if TYPE_CHECKING:
    from cprfsm.model import QemuModel

ABSENT = "absent"
_START = "start:"
_EXIT = "exit"


class _Runstate:
    """The object ``transitions`` drives; its ``state`` is the VM's runstate (or absent)."""

    state: str


class RunstateRefusedError(Exception):
    """``transitions`` refused a runstate change: QEMU's table forbids it."""


class LiveRunstate:
    """One VM's runstate, changed only through the release's transitions Machine."""

    def __init__(self, model: QemuModel, runstate: str | None) -> None:
        """Attach a fresh model object to the shared Machine of ``model``'s release."""
        self._subject = _Runstate()
        self._machine = _machine(model)
        self._machine.add_model(self._subject, initial=runstate or ABSENT)

    @property
    def runstate(self) -> str | None:
        """The current runstate, or None without a QEMU process."""
        state = self._subject.state
        return None if state == ABSENT else state

    def start(self, runstate: str) -> None:
        """A QEMU process starts in ``runstate``."""
        self._fire(_START + runstate)

    def change(self, runstate: str) -> None:
        """Change the runstate as QEMU's runstate_set would; same-state changes are no-ops."""
        if runstate != self._subject.state:
            self._fire(runstate)

    def exit(self) -> None:
        """The QEMU process went away."""
        if self._subject.state != ABSENT:
            self._fire(_EXIT)

    def detach(self) -> None:
        """Release the shared Machine's reference to this VM."""
        self._machine.remove_model(self._subject)

    def _fire(self, trigger: str) -> None:
        try:
            self._machine.events[trigger].trigger(self._subject)
        except (MachineError, KeyError) as exc:
            message = f"{self._subject.state} -> {trigger}"
            raise RunstateRefusedError(message) from exc


@functools.cache
def _machine(model: QemuModel) -> Machine:
    states = [ABSENT, *model.runstates]
    table = [
        {"trigger": new, "source": old, "dest": new}
        for old, new in sorted(model.runstate_transitions)
    ]
    starts = [
        {"trigger": _START + state, "source": ABSENT, "dest": state}
        for state in ("prelaunch", "inmigrate", "running")
    ]
    exits = [{"trigger": _EXIT, "source": model.runstates, "dest": ABSENT}]
    return Machine(
        model=None,
        states=states,
        transitions=[*table, *starts, *exits],
        initial=ABSENT,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        send_event=True,
    )
