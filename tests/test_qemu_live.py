"""Differential tests against a live QEMU 10.0.2: the golden matrix and exact event sequences."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from live.cells import CAPABILITIES, all_cells
from live.launcher import (
    VM,
    VMConfig,
    config_for,
    dump_json,
    enter_runstate,
    settle_migration,
    unix_channel,
    unix_listening,
    wait_runstate,
    wait_until,
    workdir,
)
from live.qmp import JSON, QMPError
from live.record import COLUMNS, Row, read_csv, record

from cprfsm.qmp import Guest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_available")]

GOLDEN = Path(__file__).parent / "golden" / "qemu-10.0.2.csv"
EVENTS_ON = [{"capability": "events", "state": True}]
CPR_SAVE = [
    "MIGRATION setup",
    "STOP",
    "MIGRATION_PASS 1",
    "MIGRATION active",
    "MIGRATION device",
    "MIGRATION_PASS 2",
    "MIGRATION completed",
]
LOAD_AND_RESUME = ["MIGRATION setup", "MIGRATION active", "RESUME", "MIGRATION completed"]
LOAD_ONLY = ["MIGRATION setup", "MIGRATION active", "MIGRATION completed"]
NOT_SUSPENDED = "Unable to wake up: guest is not in suspended state"


def describe_differences(expected: list[Row], actual: list[Row]) -> list[str]:
    """Explain, one line per cell, how `actual` differs from `expected`."""
    want = {row.key(): row for row in expected}
    got = {row.key(): row for row in actual}
    lines = []
    for key in sorted(want.keys() | got.keys()):
        cell = ",".join(key)
        if key not in got:
            lines.append(f"{cell}: missing from the live recording")
        elif key not in want:
            lines.append(f"{cell}: not in the golden file")
        elif want[key] != got[key]:
            changes = [
                f"{column} {old!r} -> {new!r}"
                for column, old, new in zip(
                    COLUMNS, astuple(want[key]), astuple(got[key]), strict=True
                )
                if old != new
            ]
            lines.append(f"{cell}: " + "; ".join(changes))
    return lines


def migrate_out(vm: VM, mode: str, **arguments: Any) -> JSON:
    """Set `mode` and the events capability, issue `migrate`, return the settled query-migrate."""
    vm.qmp.execute("migrate-set-parameters", mode=mode)
    vm.qmp.execute("migrate-set-capabilities", capabilities=EVENTS_ON)
    vm.qmp.execute("migrate", **arguments)
    return settle_migration(vm, 20.0)


def migrate_in(vm: VM, mode: str, uri: str) -> None:
    """On a `-incoming defer` VM: set `mode` and events, load from `uri`, wait for the end."""
    vm.qmp.execute("migrate-set-parameters", mode=mode)
    vm.qmp.execute("migrate-set-capabilities", capabilities=EVENTS_ON)
    vm.qmp.execute("migrate-incoming", uri=uri)
    vm.qmp.wait_event("MIGRATION", lambda event: event["data"]["status"] == "completed", 20.0)


@contextmanager
def cpr_reboot(directory: Path, runstate: str, destination: VMConfig) -> Iterator[tuple[VM, VM]]:
    """Save a VM in `runstate` with cpr-reboot to a file, quit it, load it into `destination`."""
    with VM(config_for(runstate), directory) as old:
        old.start()
        enter_runstate(old, runstate)
        info = migrate_out(old, "cpr-reboot", uri=f"file:{directory / 'vm.state'}")
        assert info["status"] == "completed"
        assert old.runstate() == "postmigrate"
    with VM(destination, directory, "dest") as new:
        new.start()
        migrate_in(new, "cpr-reboot", f"file:{directory / 'vm.state'}")
        yield old, new


@pytest.mark.usefixtures("qemu_golden_version")
def test_live_capabilities_are_the_matrix_capabilities() -> None:
    """The live QEMU offers exactly the 22 capabilities the matrix enumerates, in QAPI order."""
    with workdir() as directory, VM(config_for("running"), directory) as vm:
        vm.start()
        caps = [cap["capability"] for cap in vm.qmp.execute("query-migrate-capabilities")]
    assert tuple(caps) == CAPABILITIES


@pytest.mark.usefixtures("qemu_golden_version")
def test_golden_matrix_rerecords_identically() -> None:
    """Re-recording every cell on live QEMU reproduces the checked-in golden CSV exactly."""
    expected = read_csv(GOLDEN)
    started = time.monotonic()
    actual = record(all_cells(), jobs=2)
    elapsed = time.monotonic() - started
    differences = describe_differences(expected, actual)
    assert not differences, f"{len(differences)} cells differ:\n" + "\n".join(differences)
    assert elapsed < 15 * 60


def test_cpr_reboot_running_guest_resumes_running() -> None:
    """cpr-reboot of a running guest: STOP right after setup; the destination ends running."""
    destination = config_for("inmigrate")
    with workdir() as directory, cpr_reboot(directory, "running", destination) as (old, new):
        assert old.qmp.event_names() == CPR_SAVE
        assert new.qmp.event_names() == LOAD_AND_RESUME
        assert new.runstate() == "running"
        with pytest.raises(QMPError, match=NOT_SUSPENDED):
            new.qmp.execute("system_wakeup")


def test_cpr_reboot_suspended_guest_arrives_suspended() -> None:
    """A suspended guest arrives suspended (after RESUME); system_wakeup then makes it run."""
    destination = config_for("inmigrate", guest=Guest.SUSPEND)
    with workdir() as directory, cpr_reboot(directory, "suspended", destination) as (old, new):
        assert old.qmp.event_names() == ["SUSPEND", *CPR_SAVE]
        assert new.qmp.event_names() == LOAD_AND_RESUME
        assert new.runstate() == "suspended"
        new.qmp.execute("system_wakeup")
        assert new.runstate() == "running"
        # The boot sector has no S3 resume vector, so SeaBIOS reboots it: WAKEUP, RESET.
        new.qmp.wait_event("RESET", timeout=20.0)
        assert new.qmp.event_names()[len(LOAD_AND_RESUME) :] == ["WAKEUP", "RESET"]
        assert new.runstate() == "running"


def test_cpr_reboot_suspended_guest_into_paused_destination() -> None:
    """With -S the destination ends paused; cont gives suspended (RESUME), then wakeup runs it."""
    destination = config_for("inmigrate", guest=Guest.SUSPEND, start_paused=True)
    with workdir() as directory, cpr_reboot(directory, "suspended", destination) as (_, new):
        assert new.qmp.event_names() == LOAD_ONLY
        assert new.runstate() == "paused"
        with pytest.raises(QMPError, match=NOT_SUSPENDED):
            new.qmp.execute("system_wakeup")
        new.qmp.execute("cont")
        assert new.runstate() == "suspended"
        new.qmp.execute("system_wakeup")
        assert new.runstate() == "running"
        assert new.qmp.event_names()[len(LOAD_ONLY) :][:2] == ["RESUME", "WAKEUP"]


@pytest.mark.parametrize("runstate", ["running", "suspended", "paused"])
def test_failed_cpr_reboot_restores_the_runstate(runstate: str) -> None:
    """A cpr-reboot whose exec: command dies fails after STOP; a live guest gets RESUME back."""
    with workdir() as directory, VM(config_for(runstate), directory) as vm:
        vm.start()
        enter_runstate(vm, runstate)
        before = vm.qmp.event_names()
        info = migrate_out(vm, "cpr-reboot", uri="exec:true")
        assert info["status"] == "failed"
        failure = ["MIGRATION_PASS 1", "MIGRATION active", "MIGRATION failed"]
        if runstate == "paused":
            expected = ["MIGRATION setup", *failure]
        else:
            expected = ["MIGRATION setup", "STOP", *failure, "RESUME"]
        assert vm.qmp.event_names()[len(before) :] == expected
        assert vm.runstate() == runstate


def test_normal_migration_stops_only_at_switchover() -> None:
    """Normal mode keeps the guest running until after `active`, unlike the CPR modes."""
    with workdir() as directory, VM(config_for("running"), directory) as vm:
        vm.start()
        info = migrate_out(vm, "normal", uri=f"file:{directory / 'vm.state'}")
        assert info["status"] == "completed"
        assert vm.qmp.event_names() == [
            "MIGRATION setup",
            "MIGRATION_PASS 1",
            "MIGRATION active",
            "STOP",
            "MIGRATION device",
            "MIGRATION_PASS 2",
            "MIGRATION completed",
        ]
        assert vm.runstate() == "postmigrate"


@contextmanager
def cpr_transfer_started(capabilities: list[JSON]) -> Iterator[tuple[VM, VM, JSON]]:
    """An old and a new QEMU after the old one's cpr-transfer migrate; yields (old, new, main)."""
    config = config_for("running", memory="memfd,share=on", aux_ram_share=True)
    with workdir() as directory:
        cpr = unix_channel("cpr", directory / "cpr.sock")
        main = unix_channel("main", directory / "main.sock")
        incoming = config.with_incoming("defer", dump_json(cpr))
        with VM(config, directory) as old, VM(incoming, directory, "dest") as new:
            old.start()
            new.start(connect=False)
            wait_until(lambda: unix_listening(directory / "cpr.sock"), 20.0, "cpr")
            old.qmp.execute("migrate-set-parameters", mode="cpr-transfer")
            old.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
            old.qmp.execute("migrate", channels=[main, cpr])
            new.connect()
            yield old, new, main


def test_cpr_transfer_hands_the_guest_to_a_new_qemu() -> None:
    """cpr-transfer over unix sockets: source waits in setup until the destination listens."""
    with cpr_transfer_started(EVENTS_ON) as (old, new, main):
        assert new.runstate() == "inmigrate"
        # The destination learnt the mode from the cpr channel, but does not show it.
        assert new.qmp.execute("query-migrate-parameters")["mode"] == "normal"
        assert old.migration()["status"] == "setup"
        assert old.runstate() == "running"
        new.qmp.execute("migrate-set-capabilities", capabilities=EVENTS_ON)
        new.qmp.execute("migrate-incoming", channels=[main])
        assert settle_migration(old, 20.0)["status"] == "completed"
        new.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", 20.0)
        assert old.qmp.event_names() == CPR_SAVE
        assert old.runstate() == "postmigrate"
        assert new.qmp.event_names() == LOAD_AND_RESUME
        assert new.runstate() == "running"


def test_pause_before_switchover_then_continue() -> None:
    """pause-before-switchover holds a cpr-reboot in pre-switchover until migrate-continue."""
    with workdir() as directory, VM(config_for("running"), directory) as vm:
        vm.start()
        pause = {"capability": "pause-before-switchover", "state": True}
        vm.qmp.execute("migrate-set-capabilities", capabilities=[pause])
        info = migrate_out(vm, "cpr-reboot", uri=f"file:{directory / 'vm.state'}")
        assert info["status"] == "pre-switchover"
        assert vm.runstate() == "finish-migrate"
        vm.qmp.execute("migrate-continue", state="pre-switchover")
        vm.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", 20.0)
        wait_runstate(vm, "postmigrate")
        assert vm.qmp.event_names() == [
            "MIGRATION setup",
            "STOP",
            "MIGRATION_PASS 1",
            "MIGRATION active",
            "MIGRATION pre-switchover",
            "MIGRATION device",
            "MIGRATION_PASS 2",
            "MIGRATION completed",
        ]


def test_background_snapshot_keeps_the_guest_running() -> None:
    """A background snapshot stops the guest only briefly and never reaches postmigrate."""
    with workdir() as directory, VM(config_for("running"), directory) as vm:
        vm.start()
        snapshot = {"capability": "background-snapshot", "state": True}
        vm.qmp.execute("migrate-set-capabilities", capabilities=[snapshot])
        info = migrate_out(vm, "normal", uri=f"file:{directory / 'vm.state'}")
        assert info["status"] == "completed"
        assert vm.qmp.event_names() == [
            "MIGRATION setup",
            "MIGRATION active",
            "STOP",
            "RESUME",
            "MIGRATION completed",
        ]
        wait_runstate(vm, "running")


def test_background_snapshot_from_prelaunch_aborts_qemu() -> None:
    """QEMU 10.0.2 accepts a background snapshot of a -S VM, then aborts on prelaunch->paused."""
    with workdir() as directory, VM(config_for("prelaunch"), directory) as vm:
        vm.start()
        snapshot = {"capability": "background-snapshot", "state": True}
        vm.qmp.execute("migrate-set-capabilities", capabilities=[snapshot])
        vm.qmp.execute("migrate", uri=f"file:{directory / 'vm.state'}")
        returncode = wait_until(vm.returncode, 20.0, "QEMU to abort")
        assert returncode == -6
        assert vm.messages() == ["invalid runstate transition: 'prelaunch' -> 'paused'"]


def test_cpr_transfer_destination_validates_x_ignore_shared() -> None:
    """x-ignore-shared still has to match on a cpr-transfer destination, or it exits(1)."""
    ignore_shared = {"capability": "x-ignore-shared", "state": True}
    with cpr_transfer_started([ignore_shared]) as (_, new, main):
        new.qmp.execute("migrate-incoming", channels=[main])
        assert wait_until(new.returncode, 20.0, "the destination to exit") == 1
        assert new.messages()[-2:] == [
            "Capability x-ignore-shared is off, but received capability is on",
            "load of migration failed: Invalid argument",
        ]
