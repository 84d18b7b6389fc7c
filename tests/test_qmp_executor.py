"""The QMP executor against a live QEMU: starts, settle rules, cpr-reboot, exits, attach mode."""

from __future__ import annotations

import asyncio
import gc
import os
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

from cprfsm.exceptions import ExecutorError
from cprfsm.executor import Command, Exited, QmpEvent, Report, VmDefinition
from cprfsm.qmp import (
    MARKER_MAGIC,
    Guest,
    QmpExecutor,
    command_line,
    read_marker,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

SMALL = VmDefinition(ram_size=32 * 2**20)
CPR_SAVE = (
    "MIGRATION setup",
    "STOP",
    "MIGRATION_PASS 1",
    "MIGRATION active",
    "MIGRATION device",
    "MIGRATION_PASS 2",
    "MIGRATION completed",
)
LOAD_AND_RESUME = ("MIGRATION setup", "MIGRATION active", "RESUME", "MIGRATION completed")
NOT_SUSPENDED = "Unable to wake up: guest is not in suspended state"
live = pytest.mark.usefixtures("qemu_available")


def cmd(name: str, **arguments: Any) -> Command:
    """A command with keyword arguments."""
    return Command(name=name, arguments=arguments)


def labels(report: Report) -> tuple[str, ...]:
    """The report's events as labels, MIGRATION_PASS with its pass number."""
    return tuple(
        f"{fact.label} {fact.data['pass']}" if fact.name == "MIGRATION_PASS" else fact.label
        for fact in report.facts
        if isinstance(fact, QmpEvent)
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` has ended; whether it did in time."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Wait until no process of group ``pgid`` is left (zombies are reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (it holds unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="cprfsm-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(short_dir: Path) -> Iterator[QmpExecutor]:
    """An executor owning its QEMU, closed afterwards."""
    with QmpExecutor(short_dir) as executor:
        yield executor


def test_command_line_of_a_definition(short_dir: Path) -> None:
    """The argv: machine with backend and aux-ram-share, object, IDE disks, -S, -incoming."""
    definition = VmDefinition(
        memory="file,share=on",
        ram_size=64 * 2**20,
        devices=("qcow2",),
        aux_ram_share=True,
        extra_args=("-name", "vm1"),
    )
    sock, boot = short_dir / "q.sock", short_dir / "boot.img"
    argv = command_line(
        definition, workdir=short_dir, qmp_socket=sock, boot_image=boot, paused=True, incoming=True
    )
    assert argv[1:] == [
        "-accel",
        "tcg",
        "-machine",
        "pc,memory-backend=ram0,aux-ram-share=on",
        "-m",
        "64M",
        "-object",
        f"memory-backend-file,id=ram0,size=64M,share=on,mem-path={short_dir / 'ram0.ram'}",
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
        "-drive",
        f"file={boot},format=raw,if=ide,index=0,node-name=boot",
        "-drive",
        f"file={short_dir / 'qcow20.qcow2'},format=qcow2,if=ide,index=1,node-name=qcow20",
        "-S",
        "-incoming",
        "defer",
        "-name",
        "vm1",
    ]


def test_command_line_refuses_a_comma_in_a_path(short_dir: Path) -> None:
    """A path with a comma could smuggle QEMU options into -object: refused, not spliced."""
    definition = VmDefinition(memory="file,share=on")
    odd = short_dir / "a,share=off"
    with pytest.raises(ExecutorError, match="no comma"):
        command_line(definition, workdir=odd, qmp_socket=odd / "q", boot_image=short_dir / "b")


@live
@pytest.mark.qemu
@pytest.mark.parametrize(
    ("paused", "incoming", "runstate", "flag"),
    [
        (False, False, "running", None),
        (True, False, "prelaunch", "-S"),
        (False, True, "inmigrate", "-incoming"),
    ],
)
def test_start(
    qemu: QmpExecutor, *, paused: bool, incoming: bool, runstate: str, flag: str | None
) -> None:
    """start reports query-status of the fresh QEMU: running, prelaunch (-S), inmigrate."""
    report = qemu.execute(cmd("start", definition=SMALL, paused=paused, incoming=incoming))
    assert (report.runstate, report.status, report.refused, report.facts) == (
        runstate,
        "none",
        None,
        (),
    )
    assert flag is None or flag in qemu.argv
    assert qemu.pid is not None
    assert alive(qemu.pid)


@live
@pytest.mark.qemu
def test_stop_and_cont(qemu: QmpExecutor) -> None:
    """stop and cont are synchronous: STOP / RESUME arrive with the reply."""
    qemu.execute(cmd("start", definition=SMALL))
    stopped = qemu.execute(cmd("stop"))
    assert (labels(stopped), stopped.runstate) == (("STOP",), "paused")
    resumed = qemu.execute(cmd("cont"))
    assert (labels(resumed), resumed.runstate) == (("RESUME",), "running")


@live
@pytest.mark.qemu
def test_refusal_carries_qemu_text(qemu: QmpExecutor) -> None:
    """A QMP error reply is a refusal with QEMU's exact words, not an exception."""
    qemu.execute(cmd("start", definition=SMALL))
    report = qemu.execute(cmd("system_wakeup"))
    assert (report.refused, report.runstate, report.facts) == (NOT_SUSPENDED, "running", ())


@live
@pytest.mark.qemu
def test_suspend_guest_then_wakeup(short_dir: Path) -> None:
    """The SUSPEND guest enters S3 by itself (SUSPEND); system_wakeup waits for WAKEUP."""
    with QmpExecutor(short_dir, guest=Guest.SUSPEND) as qemu:
        qemu.execute(cmd("start", definition=SMALL))
        suspended = qemu.execute(cmd("guest-suspend"))
        assert (labels(suspended), suspended.runstate) == (("SUSPEND",), "suspended")
        woken = qemu.execute(cmd("system_wakeup"))
        assert labels(woken)[0] == "WAKEUP"
        assert woken.runstate == "running"


@live
@pytest.mark.qemu
@pytest.mark.parametrize("guest", list(Guest))
def test_marker_differs_across_boots(short_dir: Path, guest: Guest) -> None:
    """Each boot writes the magic and its own TSC at the marker address."""
    markers = []
    with QmpExecutor(short_dir, guest=guest) as qemu:
        for _ in range(2):
            qemu.execute(cmd("start", definition=SMALL))
            markers.append(read_marker(qemu))
            assert qemu.execute(cmd("quit")).exit == Exited(code=0)
    assert all(marker.startswith(MARKER_MAGIC) for marker in markers)
    assert markers[0] != markers[1]


@live
@pytest.mark.qemu
def test_cpr_reboot_to_a_file_and_back(qemu: QmpExecutor) -> None:
    """cpr-reboot saves to file: in QEMU's event order; a new QEMU loads the same guest RAM."""
    uri = f"file:{qemu.workdir / 'vm.state'}"
    qemu.execute(cmd("start", definition=SMALL))
    marker = read_marker(qemu)
    assert marker.startswith(MARKER_MAGIC)
    assert (
        qemu.execute(cmd("migrate-set-capabilities", capabilities={"events": True})).refused
        is None
    )
    assert qemu.execute(cmd("migrate-set-parameters", mode="cpr-reboot")).refused is None
    saved = qemu.execute(cmd("migrate", uri=uri))
    assert (labels(saved), saved.status, saved.runstate) == (CPR_SAVE, "completed", "postmigrate")
    quit_ = qemu.execute(cmd("quit"))
    assert (labels(quit_), quit_.exit, quit_.runstate) == (("SHUTDOWN",), Exited(code=0), None)

    started = qemu.execute(cmd("start", definition=SMALL, incoming=True))
    assert started.runstate == "inmigrate"
    qemu.execute(cmd("migrate-set-capabilities", capabilities={"events": True}))
    qemu.execute(cmd("migrate-set-parameters", mode="cpr-reboot"))
    loaded = qemu.execute(cmd("migrate-incoming", uri=uri))
    assert (labels(loaded), loaded.status, loaded.runstate) == (
        LOAD_AND_RESUME,
        "completed",
        "running",
    )
    assert read_marker(qemu) == marker


@live
@pytest.mark.qemu
def test_reboot_host_kills_qemu_and_wipes_volatile_files() -> None:
    """reboot-host: SIGKILL, and the state file and RAM file on tmpfs are reported lost."""
    directory = Path(tempfile.mkdtemp(prefix="cprfsm-t-", dir="/dev/shm"))
    try:
        with QmpExecutor(directory) as qemu:
            assert qemu.volatile(str(directory))
            definition = VmDefinition(memory="file,share=on", ram_size=32 * 2**20)
            qemu.execute(cmd("start", definition=definition))
            uri = f"file:{directory / 'vm.state'}"
            assert qemu.execute(cmd("migrate", uri=uri)).status == "completed"
            pid = qemu.pid
            report = qemu.execute(cmd("reboot-host"))
            assert report.exit == Exited(signal=signal.SIGKILL)
            assert (report.runstate, report.lost) == (None, (str(directory / "ram0.ram"), uri))
            assert not (directory / "vm.state").exists()
            assert pid is not None
            assert not alive(pid)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@live
@pytest.mark.qemu
def test_sigkill_during_a_migration_is_reported(qemu: QmpExecutor) -> None:
    """QEMU killed while its migration is active: the report says signal 9, QEMU's events first.

    max-bandwidth does not slow a file: migration of an idle 64 MiB guest below a
    second here, so the stream goes to a command that never reads it: once the
    pipe is full the migration stays active.
    """
    qemu.execute(cmd("start", definition=VmDefinition(ram_size=64 * 2**20)))
    qemu.execute(cmd("migrate-set-capabilities", capabilities={"events": True}))
    pid = qemu.pid
    assert pid is not None
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    started = time.monotonic()
    report = qemu.execute(cmd("migrate", uri="exec:sleep 30"))
    killer.join()
    assert time.monotonic() - started < 10
    assert labels(report)[:2] == ("MIGRATION setup", "MIGRATION_PASS 1")
    assert "MIGRATION active" in labels(report)
    assert "MIGRATION completed" not in labels(report)
    assert report.exit == Exited(signal=signal.SIGKILL)
    assert report.runstate is None
    assert wait_group_gone(pid), "the exec: child outlived QEMU"
    with pytest.raises(ExecutorError, match="no QEMU is running"):
        qemu.execute(cmd("stop"))


CONTROLLER = """
import sys, time
from pathlib import Path
from cprfsm.executor import Command, VmDefinition
from cprfsm.qmp import QmpExecutor
qemu = QmpExecutor(Path(sys.argv[1]))
qemu.execute(Command(name="start", arguments={"definition": VmDefinition(ram_size=32 << 20)}))
print(qemu.pid, flush=True)
time.sleep(120)
"""


@live
@pytest.mark.qemu
def test_a_killed_controller_leaves_no_qemu(short_dir: Path) -> None:
    """SIGKILL the Python process that started QEMU: the parent-death signal ends QEMU."""
    controller = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(short_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert controller.stdout is not None
        pid = int(controller.stdout.readline())
        assert alive(pid)
        controller.kill()
        controller.wait(timeout=10)
        assert wait_dead(pid), f"QEMU {pid} outlived its controller"
    finally:
        controller.kill()
        controller.wait()


@live
@pytest.mark.qemu
def test_close_and_garbage_collection_kill_qemu(short_dir: Path) -> None:
    """close() is idempotent and kills QEMU; an executor dropped unclosed does too."""
    qemu = QmpExecutor(short_dir / "a")
    qemu.execute(cmd("start", definition=SMALL))
    pid = qemu.pid
    assert pid is not None
    qemu.close()
    qemu.close()
    assert not alive(pid)
    dropped = QmpExecutor(short_dir / "b")
    dropped.execute(cmd("start", definition=SMALL))
    pid = dropped.pid
    assert pid is not None
    del dropped
    gc.collect()
    assert wait_dead(pid)


async def _other_client(socket_path: Path, *commands: str) -> None:
    """A second QMP client, as another management tool would be."""
    client = QMPClient("other")
    await client.connect(str(socket_path))
    try:
        for name in commands:
            await client.execute(name)
    finally:
        with suppress(EOFError, QMPError):  # after quit QEMU hangs up first
            await client.disconnect()


@live
@pytest.mark.qemu
def test_attach_observes_another_client(short_dir: Path) -> None:
    """Attached to one of two monitors: another client's stop/cont/quit arrive via observe."""
    ours, theirs = short_dir / "ours.sock", short_dir / "theirs.sock"
    definition = VmDefinition(
        ram_size=32 * 2**20, extra_args=("-qmp", f"unix:{theirs},server=on,wait=off")
    )
    boot = short_dir / "boot.img"
    boot.write_bytes(b"\xfa\xf4\xeb\xfd" + bytes(506) + b"\x55\xaa")
    argv = command_line(definition, workdir=short_dir, qmp_socket=ours, boot_image=boot)
    process = subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with QmpExecutor.attach(ours, workdir=short_dir) as qemu:
            with pytest.raises(ExecutorError, match="attached"):
                qemu.execute(cmd("start", definition=definition))
            assert qemu.observe(0.05).runstate == "running"
            asyncio.run(_other_client(theirs, "stop"))
            stopped = qemu.observe(5.0)
            assert (labels(stopped), stopped.runstate) == (("STOP",), "paused")
            asyncio.run(_other_client(theirs, "cont"))
            resumed = qemu.observe(5.0)
            assert (labels(resumed), resumed.runstate) == (("RESUME",), "running")
            asyncio.run(_other_client(theirs, "quit"))
            gone = qemu.observe(5.0)
            if not gone.exit:  # SHUTDOWN can come a moment before the socket closes
                gone = Report(facts=gone.facts + qemu.observe(5.0).facts)
            assert labels(gone) == ("SHUTDOWN",)
            exit_ = gone.exit
            assert exit_ is not None
            assert exit_.code is None
            assert exit_.signal is None
            assert exit_.message
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
