"""The ``cprfsm log`` and ``cprfsm replay`` commands: a store's events and their state."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import pytest
from structlog.testing import capture_logs

from cprfsm import _store_sqlite
from cprfsm import vm_events as ev
from cprfsm.cli import main
from cprfsm.events import Event, EventRegistry, default_registry
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import replay
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from cprfsm.events import RecordedEvent
    from cprfsm.lifecycle import VmState

PMEM = "file,share=on,path=/mnt/pmem/guest-ram"
STATE_URI = "file:/var/lib/cprfsm/vm.state"
VM = "web-1"


class Logged(NamedTuple):
    """A store written by a live machine, and the machine's state after each command."""

    path: Path
    history: list[VmState]


def cpr_reboot_cycle(store: SQLiteStore, vm_id: str, qemu: str = "10.0") -> list[VmState]:
    """Suspend, save, quit, reboot the host, restore and wake a VM; its state after each step."""
    ports = RecordingPorts()
    definition = VmDefinition(memory=PMEM, devices=("vfio",))
    vm = VirtualMachine(
        vm_id, store=store, executor=ports.executor(), definition=definition, qemu=qemu
    )
    history = [vm.state]
    steps: list[Callable[[], object]] = [
        vm.start,
        lambda: ports.write_guest(b"guest-data"),
        vm.guest_suspend,
        lambda: vm.set_parameters(mode="cpr-reboot"),
        lambda: vm.set_capabilities({"x-ignore-shared": True}),
        lambda: vm.migrate(STATE_URI),
        vm.quit,
        vm.reboot_host,
        lambda: vm.start(incoming=True),
        lambda: vm.set_parameters(mode="cpr-reboot"),
        lambda: vm.set_capabilities({"x-ignore-shared": True}),
        lambda: vm.migrate_incoming(STATE_URI),
        vm.system_wakeup,
    ]
    with capture_logs():
        for step in steps:
            step()
            history.append(vm.state)
    assert ports.ram == {"ram0": b"guest-data"}
    return history


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """One VM's cpr-reboot cycle, recorded in an SQLite store."""
    path = tmp_path_factory.mktemp("cycle") / "vms.sqlite"
    with SQLiteStore(path) as store:
        history = cpr_reboot_cycle(store, VM)
    return Logged(path, history)


@pytest.fixture(scope="module")
def two_vms(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """Two VMs in one store; the history is the second one's, on QEMU 9.0."""
    path = tmp_path_factory.mktemp("two") / "vms.sqlite"
    with SQLiteStore(path) as store:
        cpr_reboot_cycle(store, "web-2")
        history = cpr_reboot_cycle(store, "db-1", qemu="9.0")
    return Logged(path, history)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run the command line in-process; return exit status, stdout and stderr."""
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def replay_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict[str, Any]:
    """Run ``cprfsm replay --json`` successfully and parse its object."""
    status, out, err = run(capsys, "replay", "--json", *argv)
    assert (status, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


def as_json(state: VmState) -> dict[str, Any]:
    """The state's to_json() as it reads back from JSON text (tuples become lists)."""
    result: dict[str, Any] = json.loads(json.dumps(state.to_json()))
    return result


def recorded(path: Path, vm: str = VM) -> list[RecordedEvent]:
    """The events of ``vm`` as the library reads them."""
    with SQLiteStore(path, create=False) as store:
        return list(store.read(vm))


def assert_one_line_error(status: int, out: str, err: str, *parts: str) -> None:
    """Exit status 2, nothing on stdout, one readable line on stderr naming ``parts``."""
    assert status == 2
    assert out == ""
    assert err.startswith("cprfsm: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    for part in parts:
        assert part in err


class TestLog:
    """``cprfsm log`` prints every event once, in stream and version order."""

    def test_human_lines(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """One line per event: stream, version, time, type tag and the fields compactly."""
        events = recorded(logged.path)
        status, out, err = run(capsys, "log", logged.path)
        assert (status, err) == (0, "")
        lines = out.splitlines()
        assert len(lines) == len(events) == logged.history[-1].version
        for line, event in zip(lines, events, strict=True):
            stream, version, stamp, tag, *_ = line.split()
            assert (stream, int(version), tag) == (VM, event.version, event.event.type_tag)
            assert datetime.fromisoformat(stamp).tzinfo is not None
        stop = next(i for i, e in enumerate(events) if isinstance(e.event, ev.VmStopped))
        assert lines[stop].endswith(" vm.stopped runstate=finish-migrate was_suspended=true")
        assert lines[0].endswith(
            ' memory="file,share=on,path=/mnt/pmem/guest-ram" devices=["vfio"] aux_ram_share=false'
        )
        assert lines[1].endswith(" guest.suspended")

    def test_json_lines(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """--json prints one object per event whose data decodes back to the very event."""
        events = recorded(logged.path)
        status, out, _ = run(capsys, "log", "--json", logged.path)
        assert status == 0
        objects = [json.loads(line) for line in out.splitlines()]
        assert len(objects) == len(events)
        for obj, event in zip(objects, events, strict=True):
            assert set(obj) == {
                "stream",
                "version",
                "event_id",
                "recorded_at",
                "type",
                "schema_version",
                "data",
            }
            assert (obj["stream"], obj["version"], obj["event_id"]) == (
                VM,
                event.version,
                event.event_id,
            )
            assert datetime.fromisoformat(obj["recorded_at"]) == event.recorded_at
            decoded = default_registry.decode(
                obj["type"], obj["schema_version"], json.dumps(obj["data"])
            )
            assert decoded == event.event

    def test_every_vm_in_stream_order(
        self, capsys: pytest.CaptureFixture[str], two_vms: Logged
    ) -> None:
        """Without --vm every stream is printed, sorted; --vm prints only that one."""
        status, out, _ = run(capsys, "log", "--json", two_vms.path)
        assert status == 0
        keys = [(o["stream"], o["version"]) for o in map(json.loads, out.splitlines())]
        with SQLiteStore(two_vms.path, create=False) as store:
            counts = {vm: store.version(vm) for vm in store.streams()}
        assert list(counts) == ["db-1", "web-2"]
        assert keys == [(vm, v) for vm, count in counts.items() for v in range(1, count + 1)]
        status, out, _ = run(capsys, "log", "--vm", "web-2", two_vms.path)
        assert status == 0
        assert {line.split()[0] for line in out.splitlines()} == {"web-2"}

    def test_unknown_vm(self, capsys: pytest.CaptureFixture[str], two_vms: Logged) -> None:
        """An unknown --vm is exit 2 with the VMs the store holds."""
        status, out, err = run(capsys, "log", "--vm", "web-1", two_vms.path)
        assert_one_line_error(status, out, err, "unknown VM 'web-1'", "Did you mean 'web-2'?")
        assert "Valid values: db-1, web-2." in err

    def test_broken_pipe_is_quiet(self, tmp_path: Path) -> None:
        """A reader that stops early (``| head``) ends the command without a traceback."""
        path = tmp_path / "long.sqlite"
        with SQLiteStore(path) as store:
            fill_stop_cont(store, VM, 4000)
        with subprocess.Popen(
            [sys.executable, "-m", "cprfsm", "log", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            assert proc.stdout.readline().startswith(VM.encode())
            proc.stdout.close()
            err = proc.stderr.read()
        assert proc.returncode == 0
        assert err == b""


def fill_stop_cont(store: SQLiteStore, vm: str, count: int) -> None:
    """A started VM stopped and continued until its stream holds ``count`` events."""
    started = ev.QemuStarted(
        incarnation=1,
        qemu_version="10.0",
        host_boot=1,
        paused=False,
        incoming=False,
        runstate="running",
        memory="ram",
        devices=(),
        aux_ram_share=False,
    )
    store.append(vm, [started], expected_version=0)
    pair = [ev.VmStopped(runstate="paused", was_suspended=False), ev.VmResumed(runstate="running")]
    version = 1
    while version < count:
        events = (pair * 50)[: count - version]
        version = store.append(vm, events, expected_version=version)


class TestReplay:
    """``cprfsm replay`` prints the state the live machine held, rebuilt from the log alone."""

    def test_json_equals_live(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """--json is the live state's to_json(), with its vm, version and phase."""
        live = logged.history[-1]
        state = replay_json(capsys, logged.path)
        assert state == as_json(live)
        assert (state["vm"], state["version"], state["phase"]) == (VM, live.version, "running")

    def test_time_travel(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """--at N equals the live state after each command, from before any event to the end."""
        versions = [state.version for state in logged.history]
        assert versions[0] == 0
        for state in logged.history:
            assert replay_json(capsys, "--at", str(state.version), logged.path) == as_json(state)

    def test_human_output(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """Without --json the state is key: value lines, the phase first."""
        saved = next(s for s in logged.history if s.runstate is None and s.current_save)
        status, out, err = run(capsys, "replay", "--at", str(saved.version), logged.path)
        assert (status, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == "phase:          saved"
        assert [line.split(":")[0] for line in lines] == [
            "phase",
            "vm",
            "runstate",
            "was suspended",
            "qemu",
            "incarnation",
            "host boot",
            "mode",
            "capabilities",
            "statuses",
            "saved state",
        ]
        assert f"vm:             {VM}, after event {saved.version} of 27" in lines
        assert "runstate:       none (no QEMU process; last exit: quit)" in lines
        assert "capabilities:   x-ignore-shared" in lines
        assert "statuses:       outgoing none, incoming none" in lines
        assert lines[-1].startswith(f"saved state:    {STATE_URI} (10 bytes, QEMU 10.0,")

    def test_operation_in_flight(self, capsys: pytest.CaptureFixture[str], logged: Logged) -> None:
        """Stopping at an intent without its outcome shows the operation in flight."""
        events = recorded(logged.path)
        intent = next(
            e
            for e in events
            if isinstance(e.event, ev.OperationStarted) and e.event.operation == "migrate"
        )
        status, out, _ = run(capsys, "replay", "--at", str(intent.version), logged.path)
        assert status == 0
        assert out.splitlines()[-1] == (
            f"in flight:      migrate on {STATE_URI} (intent recorded, no outcome yet)"
        )
        expected = replay(VM, (e.event for e in events[: intent.version]), qemu="10.0")
        assert expected.in_flight == ("migrate", STATE_URI)
        assert replay_json(capsys, "--at", str(intent.version), logged.path) == as_json(expected)

    def test_several_vms_need_vm(
        self, capsys: pytest.CaptureFixture[str], two_vms: Logged
    ) -> None:
        """With several VMs in the store --vm is required, and chooses one."""
        status, out, err = run(capsys, "replay", two_vms.path)
        assert_one_line_error(status, out, err, "2 VMs (db-1, web-2)", "--vm")
        assert replay_json(capsys, "--vm", "db-1", two_vms.path) == as_json(two_vms.history[-1])

    def test_release_comes_from_the_log(
        self, capsys: pytest.CaptureFixture[str], two_vms: Logged
    ) -> None:
        """A VM on an older QEMU replays on that release, before its first event too."""
        assert two_vms.history[0].qemu_version == "9.0"
        for state in two_vms.history:
            at = str(state.version)
            assert replay_json(capsys, "--vm", "db-1", "--at", at, two_vms.path) == as_json(state)

    @pytest.mark.parametrize("at", ["-1", "28", "1000"])
    def test_at_out_of_range(
        self, capsys: pytest.CaptureFixture[str], logged: Logged, at: str
    ) -> None:
        """--at below 0 or beyond the log is a usage error naming the valid range."""
        status, out, err = run(capsys, "replay", "--at", at, logged.path)
        assert_one_line_error(status, out, err, f"--at {at}", "give 0 to 27")

    def test_module_entry_point(self, logged: Logged) -> None:
        """``python -m cprfsm replay STORE --json`` prints the live state."""
        proc = subprocess.run(
            [sys.executable, "-m", "cprfsm", "replay", str(logged.path), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == as_json(logged.history[-1])


_other = EventRegistry()


@_other.event("inventory.changed")
@attrs.frozen(kw_only=True)
class _InventoryChanged(Event):
    """An event of another application, unknown to cprfsm's registry."""

    item: str


def _random_bytes(path: Path, _: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(4096))  # noqa: S311 - test data


def _other_sqlite(path: Path, _: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE inventory (item TEXT)")
        connection.execute("INSERT INTO inventory VALUES ('disk')")
    connection.close()


def _newer_store(path: Path, store: Path) -> None:
    shutil.copyfile(store, path)
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {_store_sqlite._SCHEMA_VERSION + 1}")
    connection.close()


def _truncated_store(path: Path, store: Path) -> None:
    data = store.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _directory(path: Path, _: Path) -> None:
    path.mkdir()


BROKEN: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "random-bytes": (_random_bytes, "is not an SQLite database"),
    "other-sqlite": (_other_sqlite, "another application, not a cprfsm event store"),
    "newer-schema": (_newer_store, "written by a newer cprfsm"),
    "truncated": (_truncated_store, "is truncated"),
    "directory": (_directory, "is a directory"),
}


class TestUnreadableStores:
    """A store that cannot be read is exit 2 with one line, and is left as it was."""

    @pytest.mark.parametrize("command", ["log", "replay"])
    def test_missing(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
    ) -> None:
        """A missing path is an error, and no store is created there."""
        path = tmp_path / "nothere.sqlite"
        status, out, err = run(capsys, command, path)
        assert_one_line_error(status, out, err, str(path), "no event store is there")
        assert "create=True" not in err
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("command", ["log", "replay"])
    @pytest.mark.parametrize("kind", sorted(BROKEN))
    def test_broken_file_is_left_untouched(
        self,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
        logged: Logged,
        command: str,
        kind: str,
    ) -> None:
        """Random bytes, another SQLite db, a newer or truncated store: refused untouched."""
        make, problem = BROKEN[kind]
        path = tmp_path / "broken.sqlite"
        make(path, logged.path)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        status, out, err = run(capsys, command, path)
        assert_one_line_error(status, out, err, str(path), problem)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        assert after == before

    def test_empty_store(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A store without events logs nothing; replaying it or naming a VM is exit 2."""
        path = tmp_path / "empty.sqlite"
        SQLiteStore(path).close()
        assert run(capsys, "log", path) == (0, "", "")
        argvs: list[list[str | Path]] = [["replay", path], ["log", "--vm", VM, path]]
        for argv in argvs:
            status, out, err = run(capsys, *argv)
            assert_one_line_error(status, out, err, f"{path} holds no VM yet")

    def test_log_that_does_not_fit_the_model(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A log the model forbids can be listed, but replaying it is exit 2 saying where."""
        path = tmp_path / "odd.sqlite"
        with SQLiteStore(path) as store:
            store.append(VM, [ev.VmResumed(runstate="running")], expected_version=0)
        assert run(capsys, "log", path)[0] == 0
        status, out, err = run(capsys, "replay", path)
        assert_one_line_error(status, out, err, "event 1 (VmResumed) needs a QEMU process")
        assert f"in the log of {VM!r} in {path}" in err

    def test_events_of_another_application(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """An event type cprfsm does not know is exit 2 naming the stream and version."""
        path = tmp_path / "other.sqlite"
        with SQLiteStore(path, registry=_other) as store:
            store.append("shelf", [_InventoryChanged(item="disk")], expected_version=0)
        for command in ("log", "replay"):
            status, out, err = run(capsys, command, path)
            assert_one_line_error(
                status, out, err, "cannot decode event 'inventory.changed'", "at version 1"
            )
