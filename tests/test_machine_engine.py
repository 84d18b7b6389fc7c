"""The machine as a transitions engine: divergences from the model, strict mode, no leaks."""

from __future__ import annotations

import gc
import weakref
from typing import TYPE_CHECKING

import pytest

from cprfsm import vm_events as ev
from cprfsm._engine import machine_of, trigger_table
from cprfsm.exceptions import ModelDivergence
from cprfsm.executor import Report
from cprfsm.lifecycle import rebuild
from cprfsm.machine import VirtualMachine
from cprfsm.model import COMMANDS, load_model, modelled_releases
from cprfsm.ports import RecordingPorts
from cprfsm.store import InMemoryStore

if TYPE_CHECKING:
    from cprfsm.executor import Command, Executor


class LyingQemu:
    """An executor whose QEMU ignores ``stop``: it reports running and no STOP event."""

    def __init__(self, inner: Executor) -> None:
        """Wrap a working executor."""
        self._inner = inner

    def execute(self, command: Command) -> Report:
        """Carry out everything but stop, which QEMU "forgets"."""
        if command.name == "stop":
            return Report(runstate="running")
        return self._inner.execute(command)

    def observe(self, timeout: float) -> Report:
        """What the wrapped executor observes."""
        return self._inner.observe(timeout)

    def volatile(self, path: str) -> bool:
        """As the wrapped executor says."""
        return self._inner.volatile(path)

    def close(self) -> None:
        """Close the wrapped executor."""
        self._inner.close()


def lying_vm(*, strict: bool) -> tuple[VirtualMachine, InMemoryStore]:
    """A started VM whose QEMU ignores stop."""
    store = InMemoryStore()
    vm = VirtualMachine(
        "vm",
        store=store,
        executor=LyingQemu(RecordingPorts().executor()),
        qemu="10.0",
        strict=strict,
    )
    vm.start()
    return vm, store


def test_a_divergence_is_recorded_and_qemu_adopted() -> None:
    """QEMU did not stop: both sides are recorded, and the log follows QEMU."""
    vm, store = lying_vm(strict=False)
    events = vm.stop()
    assert [type(e) for e in events] == [ev.ModelDiverged]
    diverged = events[0]
    assert isinstance(diverged, ev.ModelDiverged)
    assert diverged.expected == ("STOP", "runstate paused", "status none")
    assert diverged.observed == ("runstate running", "status none")
    assert (vm.state.runstate, vm.runstate) == ("running", "running")
    assert rebuild(store, "vm") == vm.state


def test_strict_mode_raises_after_recording() -> None:
    """With strict=True the divergence is in the log before ModelDivergence is raised."""
    vm, store = lying_vm(strict=True)
    with pytest.raises(ModelDivergence, match="the model predicted STOP") as caught:
        vm.stop()
    recorded = [r.event for r in store.read("vm")]
    assert recorded[-1] == caught.value.divergence
    assert vm.state.runstate == "running"


def test_closed_and_collected_vms_leave_the_shared_machine() -> None:
    """1,000 VMs created and dropped (or closed) leave no model attached to the machine."""
    machine = machine_of(load_model("10.0"))
    seats = []
    for index in range(1000):
        vm = VirtualMachine(
            f"vm{index}", store=InMemoryStore(), executor=RecordingPorts().executor()
        )
        seats.append(weakref.ref(vm._engine._subject))
        if index % 2:
            vm.close()
        del vm
    gc.collect()
    assert [seat for seat in seats if seat() is not None] == []  # none held by the machine
    assert len(machine.models) < 1000


def test_every_command_is_a_trigger_with_a_condition_and_callbacks() -> None:
    """Each release's machine has one trigger per command, each guarded and with callbacks."""
    for version in modelled_releases():
        model = load_model(version)
        table = trigger_table(model)
        assert table["command triggers"] == len(COMMANDS)
        assert table["runstate triggers"] == len(
            {new for _, new in model.runstate_transitions} | {"absent"}
        )
        states = len(model.runstates) + 1
        assert table["conditions"] == len(COMMANDS) * states
        assert table["callbacks"] == 2 * len(COMMANDS) * states
