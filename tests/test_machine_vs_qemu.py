"""Step-by-step differential test of the lifecycle machine against a live QEMU 10.0.2.

Each scenario drives :class:`cprfsm.machine.VirtualMachine` with the shipped QMP executor
(:mod:`cprfsm.qmp`) on a real QEMU, ``events`` capability on.  The machine compares every
step's QMP events, runstate and migration status (with its error) with the model's
prediction and records ``model.diverged`` where QEMU did something else; the harness
(``tests/live/drive.py``) fails a step that recorded one, checks the runstate once more
with ``query-status``, and sends a command the model refused to QEMU to check that QEMU
refuses it with the same text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from live.drive import Driven, Refused
from live.launcher import workdir

from cprfsm.qmp import Guest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]

EVENTS = {"events": True}


class Pair(Driven):
    """A driven VM with the scenarios' vocabulary (start with a chosen guest, refusals)."""

    def start(
        self, guest: Guest = Guest.LOOP, *, paused: bool = False, incoming: bool = False
    ) -> None:
        """Start QEMU with ``guest``: plain, ``-S`` (paused) or ``-incoming defer``."""
        self.executor.guest = guest
        self.do("start", paused=paused, incoming=incoming)

    def quit(self) -> None:
        """Quit QEMU; the process exits after SHUTDOWN."""
        self.do("quit")

    def refusal(self, command: str) -> str | None:
        """Run ``command``: the text both refused it with, or None when both accepted it."""
        try:
            self.do(command)
        except Refused as exc:
            return exc.text
        return None


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A machine on a live QEMU, killed afterwards."""
    with workdir() as directory:
        driven = Pair(directory)
        try:
            yield driven
        finally:
            driven.close()


def save_quit(pair: Pair) -> None:
    """cpr-reboot the current QEMU to the state file, then quit it."""
    pair.do("set_capabilities", EVENTS)
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate", pair.uri)
    pair.quit()


def restore(pair: Pair, guest: Guest = Guest.LOOP, *, paused: bool = False) -> None:
    """Start QEMU with -incoming defer, set cpr-reboot and load the state file."""
    pair.start(guest, paused=paused, incoming=True)
    pair.do("set_capabilities", EVENTS)
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate_incoming", pair.uri)


def start_suspended(pair: Pair) -> None:
    """Boot the SUSPEND guest from -S, so that S3 cannot race the first comparisons."""
    pair.start(Guest.SUSPEND, paused=True)
    pair.do("cont")
    pair.do("guest_suspend")


def test_cpr_reboot_running_guest(pair: Pair) -> None:
    """cpr-reboot of a running guest to file:, quit, and a -incoming defer QEMU runs it."""
    pair.start()
    save_quit(pair)
    restore(pair)
    assert pair.machine.state.runstate == "running"


def test_cpr_reboot_paused_guest(pair: Pair) -> None:
    """cpr-reboot of a paused guest: no STOP at the save, and the destination ends paused."""
    pair.start()
    pair.do("stop")
    save_quit(pair)
    restore(pair)
    assert pair.machine.state.runstate == "paused"


def test_normal_migration_then_cont_on_the_source(pair: Pair) -> None:
    """Normal mode to file: stops at switchover; cont then runs the source from postmigrate."""
    pair.start()
    pair.do("set_capabilities", EVENTS)
    pair.do("migrate", pair.uri)
    pair.do("cont")
    assert (pair.machine.state.runstate, pair.machine.state.outgoing_status) == (
        "running",
        "completed",
    )


def test_cpr_reboot_suspended_guest_then_wakeup(pair: Pair) -> None:
    """A suspended guest arrives suspended (RESUME); system_wakeup then runs it (WAKEUP)."""
    start_suspended(pair)
    save_quit(pair)
    restore(pair, Guest.SUSPEND)
    assert pair.machine.state.runstate == "suspended"
    pair.do("system_wakeup")
    assert pair.machine.state.runstate == "running"


def test_paused_destination_then_cont(pair: Pair) -> None:
    """A destination started with -S ends paused; cont runs it (RESUME)."""
    pair.start()
    save_quit(pair)
    restore(pair, paused=True)
    assert pair.machine.state.runstate == "paused"
    pair.do("cont")
    assert pair.machine.state.runstate == "running"


@pytest.mark.parametrize("mode", ["cpr-reboot", "normal"])
def test_pause_before_switchover_then_cancel(pair: Pair, mode: str) -> None:
    """migrate stops in pre-switchover; migrate_cancel resumes the guest and cancels."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"pause-before-switchover": True})
    pair.do("set_parameters", mode=mode)
    pair.do("migrate", pair.uri)
    assert pair.machine.state.outgoing_status == "pre-switchover"
    pair.do("migrate_cancel")
    assert pair.machine.state.runstate == "running"


@pytest.mark.parametrize("mode", ["cpr-reboot", "normal"])
def test_pause_before_switchover_then_continue(pair: Pair, mode: str) -> None:
    """migrate stops in pre-switchover; migrate-continue goes on to device and completed."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"pause-before-switchover": True})
    pair.do("set_parameters", mode=mode)
    pair.do("migrate", pair.uri)
    assert pair.machine.state.outgoing_status == "pre-switchover"
    pair.do("migrate_continue")
    assert pair.machine.state.runstate == "postmigrate"


def test_return_path_on_file_fails_at_completion(pair: Pair) -> None:
    """return-path on file: in cpr-reboot fails after the STOP; the guest runs again."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"return-path": True})
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate", pair.uri)
    assert (pair.machine.state.runstate, pair.machine.state.outgoing_status) == (
        "running",
        "failed",
    )


def test_stop_and_cont_a_suspended_guest(pair: Pair) -> None:
    """stop pauses a suspended guest, system_wakeup is refused alike, cont gives suspended."""
    start_suspended(pair)
    pair.do("stop")
    refusal = pair.refusal("system_wakeup")
    assert refusal == "Unable to wake up: guest is not in suspended state"
    pair.do("cont")
    assert pair.machine.state.runstate == "suspended"
    pair.do("system_wakeup")
    assert pair.machine.state.runstate == "running"


def test_quit_during_a_migration_cancels_it(pair: Pair) -> None:
    """quit while paused in pre-switchover: SHUTDOWN, then MIGRATION cancelling, then exit."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"pause-before-switchover": True})
    pair.do("migrate", pair.uri)
    events = pair.do("quit")  # the harness fails the step if QEMU's events differ
    assert [type(e).__name__ for e in events] == ["MigrationStatusReported", "QemuExited"]
    assert pair.machine.state.runstate is None


def test_a_save_that_failed_at_completion_leaves_a_loadable_file(pair: Pair) -> None:
    """return-path on file: fails after the stream is complete; a new QEMU loads it."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"return-path": True})
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate", pair.uri)
    assert pair.machine.state.outgoing_status == "failed"
    assert pair.machine.state.state_file(pair.uri) is not None
    pair.quit()
    pair.start(incoming=True)
    pair.do("set_capabilities", EVENTS)
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate_incoming", pair.uri)
    assert (pair.machine.state.incoming_status, pair.machine.state.runstate) == (
        "completed",
        "running",
    )
