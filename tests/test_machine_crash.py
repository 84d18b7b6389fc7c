"""A controller killed with SIGKILL mid-operation leaves a clean log with the intent in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

from cprfsm import StoreError
from cprfsm import vm_events as ev
from cprfsm.lifecycle import rebuild
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from pathlib import Path

CHILD = textwrap.dedent(
    """
    import sys, time
    from cprfsm.machine import VirtualMachine
    from cprfsm.ports import RecordingPorts
    from cprfsm.store import SQLiteStore

    class SlowPorts(RecordingPorts):
        def save(self, writer, skip):
            time.sleep(120)  # the parent kills us here, after the intent is stored
            return super().save(writer, skip)

    with SQLiteStore(sys.argv[1]) as store:
        vm = VirtualMachine("vm", store=store, ports=SlowPorts().ports(), qemu="10.0")
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.migrate("file:/var/lib/cprfsm/vm.state")
    """
)


def wait_for_intent(path: Path, deadline: float) -> None:
    """Poll the store until the ram.save intent is recorded."""
    while time.monotonic() < deadline:
        try:
            with SQLiteStore(path, create=False) as store:
                if any(
                    isinstance(r.event, ev.OperationStarted) and r.event.operation == "ram.save"
                    for r in store.read("vm")
                ):
                    return
        except StoreError:  # the child has not created the store yet
            pass
        time.sleep(0.05)
    raise AssertionError("the child never recorded the ram.save intent")


def test_sigkill_mid_save_leaves_the_intent_in_flight(tmp_path: Path) -> None:
    """After SIGKILL the log replays, shows ram.save in flight, and recover() resumes the guest."""
    path = tmp_path / "log.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)])
    try:
        wait_for_intent(path, time.monotonic() + 60)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with SQLiteStore(path, create=False) as store:
        state = rebuild(store, "vm")
        assert state.in_flight == ("ram.save", "file:/var/lib/cprfsm/vm.state")
        assert (state.runstate, state.outgoing_status) == ("finish-migrate", "active")
        vm = VirtualMachine("vm", store=store, ports=RecordingPorts().ports())
        events = vm.recover()
        assert [type(e) for e in events] == [
            ev.OperationFailed,
            ev.MigrationStatusReported,
            ev.VmResumed,
        ]
        assert (vm.state.in_flight, vm.state.runstate) == (None, "running")
        assert vm.recover() == ()
