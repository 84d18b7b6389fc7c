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
        vm = VirtualMachine("vm", store=store, executor=SlowPorts().executor(), qemu="10.0")
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.migrate("file:/var/lib/cprfsm/vm.state")
    """
)


def wait_for_intent(path: Path, deadline: float) -> None:
    """Poll the store until the migrate intent is recorded."""
    while time.monotonic() < deadline:
        try:
            with SQLiteStore(path, create=False) as store:
                if any(
                    isinstance(r.event, ev.OperationStarted) and r.event.operation == "migrate"
                    for r in store.read("vm")
                ):
                    return
        except StoreError:  # the child has not created the store yet
            pass
        time.sleep(0.05)
    raise AssertionError("the child never recorded the migrate intent")


def test_sigkill_mid_save_leaves_the_intent_in_flight(tmp_path: Path) -> None:
    """After SIGKILL the log replays with migrate in flight; recover() records QEMU gone."""
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
        assert state.in_flight == ("migrate", "file:/var/lib/cprfsm/vm.state")
        # Nothing QEMU reported was recorded: the outcome comes after the executor reports.
        assert (state.runstate, state.outgoing_status) == ("running", "none")
        vm = VirtualMachine("vm", store=store, executor=RecordingPorts().executor())
        events = vm.recover()
        assert [type(e) for e in events] == [ev.OperationFailed, ev.QemuObserved]
        assert events[-1].runstate is None  # type: ignore[attr-defined]
        assert (vm.state.in_flight, vm.state.runstate, vm.runstate) == (None, None, None)
        assert vm.recover() == ()
        assert rebuild(store, "vm") == vm.state
