"""Faults on a live QEMU: killed mid-migrate, and a controller killed with its QEMU running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cprfsm import vm_events as ev
from cprfsm.lifecycle import rebuild
from cprfsm.machine import VirtualMachine
from cprfsm.qmp import QmpExecutor
from cprfsm.store import SQLiteStore

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]


def kill_soon(pid: int) -> threading.Thread:
    """A thread that SIGKILLs QEMU in 2 s, while its migration waits on a reader."""

    def run() -> None:
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_qemu_killed_mid_migrate_is_recorded_with_its_signal(tmp_path: Path) -> None:
    """The exit and its signal are in the log; the VM is recoverable and starts again."""
    work = tmp_path / "w"
    with SQLiteStore(tmp_path / "log.sqlite") as store, QmpExecutor(work) as qemu:
        vm = VirtualMachine("vm", store=store, executor=qemu, qemu="10.0")
        vm.start()
        vm.set_capabilities({"events": True})
        vm.set_parameters(mode="cpr-reboot")
        assert qemu.pid is not None
        killer = kill_soon(qemu.pid)
        events = vm.migrate("exec:sleep 30")  # never reads: the migration stays active
        killer.join()
        exits = [e for e in events if isinstance(e, ev.QemuExited)]
        assert len(exits) == 1
        assert exits[0].reason == "killed"
        assert exits[0].detail.startswith("signal 9")
        assert vm.state.runstate is None
        assert vm.state.in_flight is None
        assert vm.recover() == ()
        vm.start()
        assert vm.state.runstate == "running"
        assert rebuild(store, "vm") == vm.state


CONTROLLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import structlog
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    from cprfsm.machine import VirtualMachine
    from cprfsm.qmp import QmpExecutor
    from cprfsm.store import InMemoryStore

    qemu = QmpExecutor(Path(sys.argv[1]))
    vm = VirtualMachine("vm", store=InMemoryStore(), executor=qemu, qemu="10.0")
    vm.start()
    print(qemu.pid, flush=True)
    time.sleep(120)
    """
)


def test_a_controller_killed_with_sigkill_leaves_no_qemu(tmp_path: Path) -> None:
    """QEMU dies with the controller process that started it through the machine."""
    work = tmp_path / "c"
    child = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert alive(pid)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"QEMU {pid} outlived its controller"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    return not stat.split(") ")[1].startswith("Z")
