"""cprfsm watch against a live QEMU driven by another QMP client: events, replay, exit, Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from qemu.qmp import QMPClient, QMPError

from cprfsm.executor import VmDefinition
from cprfsm.qmp import Guest, command_line, write_boot_image
from cprfsm.store import SQLiteStore
from cprfsm.watch import watch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cprfsm.events import Event

ROOT = Path(__file__).resolve().parent.parent
WATCH = (sys.executable, "-m", "cprfsm", "watch")
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
live = pytest.mark.usefixtures("qemu_available")
pytestmark = [pytest.mark.qemu, live]


class Qemu:
    """A QEMU started by the test (not by cprfsm) with two QMP monitors: ours and theirs."""

    def __init__(self, workdir: Path) -> None:
        """Start QEMU paused (-S) with the SUSPEND guest and two QMP sockets."""
        self.workdir = workdir
        self.ours, self.theirs = workdir / "ours.sock", workdir / "theirs.sock"
        definition = VmDefinition(
            ram_size=32 * 2**20, extra_args=("-qmp", f"unix:{self.theirs},server=on,wait=off")
        )
        boot = write_boot_image(Guest.SUSPEND, workdir / "boot.img")
        argv = command_line(
            definition, workdir=workdir, qmp_socket=self.ours, boot_image=boot, paused=True
        )
        self.process = subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not (self.ours.exists() and self.theirs.exists()):
            assert time.monotonic() < deadline, "QEMU's QMP sockets did not appear"
            time.sleep(0.01)

    def qmp(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one command through the OTHER monitor, as another management tool would."""
        return asyncio.run(_send(self.theirs, name, arguments))

    def runstate(self) -> str:
        """QEMU's runstate as query-status reports it."""
        return str(self.qmp("query-status")["status"])

    def until(self, runstate: str, status: str | None = None) -> None:
        """Wait until QEMU is in ``runstate`` (and its migration in ``status``)."""
        deadline = time.monotonic() + 15
        while (self.runstate(), status and self.qmp("query-migrate").get("status")) != (
            runstate,
            status,
        ):
            assert time.monotonic() < deadline, f"QEMU never reached {runstate} {status}"
            time.sleep(0.02)

    def quit(self) -> None:
        """Quit QEMU through the other monitor and wait for the process to end."""
        with suppress(EOFError, QMPError):
            self.qmp("quit")
        # QEMU 10.0.2 exits 0, but once in a CI run it died of SIGSEGV while shutting
        # down with the watcher's monitor still polling (docs/fidelity.md): a QEMU race,
        # not the watcher's business; any other end is a failure.
        assert self.process.wait(timeout=10) in {0, -signal.SIGSEGV}


async def _send(socket_path: Path, name: str, arguments: dict[str, Any] | None) -> Any:
    """One QMP command on a fresh connection to ``socket_path``."""
    client = QMPClient("other")
    await client.connect(str(socket_path))
    try:
        return await client.execute(name, arguments)
    finally:
        with suppress(EOFError, QMPError):  # after quit QEMU hangs up first
            await client.disconnect()


@pytest.fixture
def qemu() -> Iterator[Qemu]:
    """A QEMU someone else (the test) started, killed afterwards if it still runs."""
    workdir = Path(tempfile.mkdtemp(prefix="cprfsm-w-"))
    started = Qemu(workdir)
    yield started
    started.process.kill()
    started.process.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``cprfsm ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "cprfsm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def replayed(store: Path, vm: str, *at: str) -> dict[str, Any]:
    """``cprfsm replay STORE --vm VM --json`` (``at``: e.g. ``--at 5``), parsed."""
    result = cli("replay", str(store), "--vm", vm, "--json", *at)
    assert result.returncode == 0, result.stderr
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def drive_lifecycle(qemu: Qemu) -> None:
    """Another client's cont (the guest suspends), stop, cont, system_wakeup."""
    qemu.qmp("cont")
    qemu.until("suspended")  # the SUSPEND guest enters S3 by itself
    qemu.qmp("stop")
    qemu.until("paused")
    time.sleep(0.6)  # a poll of the watcher: the next cont is a batch of its own
    qemu.qmp("cont")
    qemu.until("suspended")
    qemu.qmp("system_wakeup")
    qemu.until("running")


LIFECYCLE = [
    "qemu.started",  # prelaunch: QEMU runs with -S
    "vm.resumed",
    "guest.suspended",
    "vm.stopped",
    "vm.resumed",
    "guest.woke-up",  # QEMU's RESET after WAKEUP has no lifecycle meaning
]


def test_watch_records_another_clients_lifecycle_until_qemu_quits(qemu: Qemu) -> None:
    """stop, cont, S3, wakeup and a normal migrate with events are recorded as the model says."""
    store = qemu.workdir / "log.sqlite"
    batches: list[tuple[Event, ...]] = []
    result: dict[str, Any] = {}
    watcher = threading.Thread(
        target=lambda: result.update(
            state=watch(qemu.ours, store=store, vm="vm1", on_events=batches.append, poll=0.1)
        )
    )
    watcher.start()
    deadline = time.monotonic() + 10
    while not batches:  # QEMU adopted: the watch is under way
        assert time.monotonic() < deadline, "the watcher did not attach"
        time.sleep(0.01)
    drive_lifecycle(qemu)
    qemu.qmp("migrate-set-capabilities", EVENTS_ON)
    qemu.qmp("migrate", {"uri": f"file:{qemu.workdir}/vm.state"})
    qemu.until("postmigrate", "completed")
    time.sleep(0.5)
    qemu.quit()
    watcher.join(timeout=20)
    assert not watcher.is_alive()
    types = [event.type_tag for batch in batches for event in batch]
    assert types == [
        *LIFECYCLE,
        "migration.capabilities-set",  # re-read from QEMU as the migration started
        "migration.started",
        "migration.status",  # active
        "vm.stopped",  # finish-migrate
        "migration.status",  # device
        "migration.status",  # completed
        "vm.runstate-set",  # postmigrate
        "qemu.exited",
    ]
    events = [event for batch in batches for event in batch]
    started = events[LIFECYCLE.index("guest.woke-up") + 2]
    assert getattr(started, "capabilities", None) == frozenset({"events"})
    assert getattr(events[-1], "reason", None) == "quit"
    assert result["state"].runstate is None
    with SQLiteStore(store, create=False) as opened:
        assert [r.event for r in opened.read("vm1")] == events
    before_quit = replayed(store, "vm1", "--at", str(len(events) - 1))
    assert (before_quit["runstate"], before_quit["outgoing_status"]) == (
        "postmigrate",
        "completed",
    )
    final = replayed(store, "vm1")
    assert (final["runstate"], final["last_exit"]) == (None, "quit")


def test_cli_watch_survives_ctrl_c_with_a_replayable_store(qemu: Qemu) -> None:
    """SIGINT mid-way: exit 0, a summary line, and the store replays QEMU's real runstate."""
    store = qemu.workdir / "log.sqlite"
    watcher = subprocess.Popen(
        [*WATCH, str(qemu.ours), "--store", str(store), "--vm", "vm1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert watcher.stdout is not None
    first = watcher.stdout.readline()  # QEMU adopted: the watch is under way
    assert " qemu.started " in first
    drive_lifecycle(qemu)
    qemu.qmp("migrate", {"uri": f"file:{qemu.workdir}/vm.state"})  # events capability off
    qemu.until("postmigrate", "completed")
    time.sleep(1.0)  # two polls of the watcher
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=20)
    assert (watcher.returncode, err) == (0, "")
    lines = [first, *out.splitlines()]
    types = [line.split()[3] for line in lines[:-1]]
    # Without the events capability QEMU emits only the switch-over STOP; what
    # query-status / query-migrate report meanwhile (active, device: depends on
    # when the watcher polls) and at the end is adopted.
    migration = types[len(LIFECYCLE) :]
    assert types[: len(LIFECYCLE)] == LIFECYCLE
    assert [t for t in migration if t != "qemu.observed"] == ["vm.stopped"]
    assert migration[-1] == "qemu.observed"
    summary = f"watched vm1: interrupted; {len(types)} events recorded, 0 divergences"
    assert lines[-1].startswith(summary)
    state = replayed(store, "vm1")
    assert (
        (state["runstate"], state["phase"])
        == (qemu.runstate(), "saved")
        == (
            "postmigrate",
            "saved",
        )
    )
    qemu.quit()


def test_cli_watch_exits_when_qemu_quits(qemu: Qemu) -> None:
    """With --json: one object per event and a summary; exit 0 once QEMU has quit."""
    store = qemu.workdir / "log.sqlite"
    watcher = subprocess.Popen(
        [*WATCH, str(qemu.ours), "--store", str(store), "--vm", "vm1", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert watcher.stdout is not None
    assert json.loads(watcher.stdout.readline())["type"] == "qemu.started"
    qemu.qmp("cont")
    qemu.until("suspended")
    qemu.quit()
    out, _ = watcher.communicate(timeout=20)
    assert watcher.returncode == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["type"] for o in objects] == [
        "vm.resumed",
        "guest.suspended",
        "qemu.exited",
        "watch.summary",
    ]
    assert objects[-1] == {
        "type": "watch.summary",
        "vm": "vm1",
        "ended": "qemu-exited",
        "events": 4,
        "diverged": 0,
        "version": 4,
        "runstate": None,
        "phase": "stopped",
    }
    assert replayed(store, "vm1")["last_exit"] == "quit"


def test_cli_watch_refuses_what_is_not_a_qmp_socket(tmp_path: Path) -> None:
    """A missing path and a plain file: exit 2 with one line, and no store is created."""
    plain = tmp_path / "plain"
    plain.write_text("not a socket\n")
    missing = cli(
        "watch", str(tmp_path / "nope.sock"), "--store", str(tmp_path / "s"), "--vm", "a"
    )
    not_socket = cli("watch", str(plain), "--store", str(tmp_path / "s"), "--vm", "a")
    expected = (
        (missing, f"no QMP socket at {tmp_path / 'nope.sock'}"),
        (not_socket, f"{plain} is not a unix socket"),
    )
    for result, says in expected:
        assert result.returncode == 2
        assert result.stderr.startswith(f"cprfsm: error: {says}")
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_cli_watch_refused_connection_and_foreign_store(qemu: Qemu) -> None:
    """A socket nobody listens on and a store that is not one: exit 2 with one line each."""
    import socket  # noqa: PLC0415 - only this test makes a dead socket

    dead = qemu.workdir / "dead.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(dead))
    refused = cli("watch", str(dead), "--store", str(qemu.workdir / "s"), "--vm", "a")
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"cprfsm: error: cannot connect to QMP at {dead}")
    assert not (qemu.workdir / "s").exists()
    foreign = qemu.workdir / "foreign"
    foreign.write_text("hello\n")
    wrong = cli("watch", str(qemu.ours), "--store", str(foreign), "--vm", "a")
    assert wrong.returncode == 2
    assert wrong.stderr == (
        f"cprfsm: error: {foreign}: is not an SQLite database; "
        "give the path of a cprfsm event store, or of a new file\n"
    )
    assert qemu.runstate() == "prelaunch"  # the watch that failed left QEMU alone
