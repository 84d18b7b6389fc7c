"""Step-by-step differential test of the lifecycle machine against a live QEMU 10.0.2.

Each scenario runs the same commands on :class:`cprfsm.machine.VirtualMachine` (recording
ports, in-memory store) and on real QEMU over QMP with the ``events`` capability on.  After
every step both sides must agree on the runstate, on the events the step produced, on the
migration status (and its error text when it failed) and on a refusal's text.

Events are compared in QEMU's terms.  VmStopped is STOP, VmResumed RESUME, GuestSuspended
SUSPEND, GuestWokeUp WAKEUP, MigrationStarted and IncomingStarted (status setup, outgoing
and incoming) ``MIGRATION setup``, MigrationStatusReported ``MIGRATION <status>``, and
QemuExited (quit) SHUTDOWN.  The machine's other events (operations, RAM and device
transfers, RunstateSet, ParametersSet, ...) have no QMP event.  QEMU's MIGRATION_PASS and
RESET have no machine event.  Those are left out on both sides; every other QEMU event is
compared.
"""

from __future__ import annotations

from contextlib import ExitStack, suppress
from typing import TYPE_CHECKING, Any

import pytest
from live.launcher import VM, VMConfig, settle_migration, wait_until, workdir
from live.qmp import JSON, QMPError

from cprfsm import IllegalTransition
from cprfsm import vm_events as ev
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.qmp import Guest
from cprfsm.store import InMemoryStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

    from cprfsm.events import Event

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]

SETTLE = 20.0  # the longest wait for QEMU to settle after a step
EVENT_WAIT = 5.0  # the longest wait for an event a settled QEMU still owes
EVENTS = {"events": True}
PLAIN = {
    ev.VmStopped: "STOP",
    ev.VmResumed: "RESUME",
    ev.GuestSuspended: "SUSPEND",
    ev.GuestWokeUp: "WAKEUP",
    ev.MigrationStarted: "MIGRATION setup",
    ev.IncomingStarted: "MIGRATION setup",
    ev.QemuExited: "SHUTDOWN",
}
NO_MACHINE_EVENT = frozenset({"MIGRATION_PASS", "RESET"})
# Where a load ends; QEMU has emitted the MIGRATION event of that status by then.
INCOMING_DONE = frozenset({"completed", "failed"})


def machine_labels(events: Iterable[Event]) -> list[str]:
    """The machine's events as the QMP events QEMU emits for them."""
    labels = []
    for event in events:
        if isinstance(event, ev.MigrationStatusReported):
            labels.append(f"MIGRATION {event.status}")
        elif type(event) in PLAIN:
            labels.append(PLAIN[type(event)])
    return labels


def qemu_labels(events: Iterable[JSON]) -> list[str]:
    """QEMU's QMP events as labels, without those the machine has no event for."""
    labels = []
    for event in events:
        name = str(event["event"])
        if name == "MIGRATION":
            labels.append(f"MIGRATION {event['data']['status']}")
        elif name not in NO_MACHINE_EVENT:
            labels.append(name)
    return labels


def emitted(vm: VM, seen: int, label: str, timeout: float = EVENT_WAIT) -> None:
    """Read QMP until ``label`` was emitted after the first ``seen`` events, or give up.

    Giving up is not an error here: the comparison that follows shows what is missing.
    """

    def arrived() -> bool | None:
        vm.qmp.execute("query-status")  # reading the reply collects the events before it
        return True if label in qemu_labels(vm.qmp.events[seen:]) else None

    with suppress(TimeoutError):
        wait_until(arrived, timeout, label)


def status_of(info: JSON) -> str:
    """The status in a query-migrate answer (``none`` for an empty one)."""
    return str(info.get("status", "none"))


class Differential:
    """One VM driven on the machine and on live QEMU, compared after every step."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        """Start with a machine that has no QEMU yet and no QEMU process."""
        self.directory = directory
        self.uri = f"file:{directory / 'vm.state'}"
        self.machine = VirtualMachine(
            "vm", store=InMemoryStore(), executor=RecordingPorts().executor(), qemu="10.0"
        )
        self.qemu: VM | None = None
        self.incoming = False
        self._stack = stack
        self._steps: list[str] = []
        self._started = 0
        self._error = ""  # the machine's text for the last failed migration

    def start(
        self, guest: Guest = Guest.LOOP, *, paused: bool = False, incoming: bool = False
    ) -> None:
        """Start QEMU: plain, with ``-S`` (paused), with ``-incoming defer`` (incoming)."""
        config = VMConfig(guest, paused, ("defer",) if incoming else ())
        self._started += 1
        vm = self._stack.enter_context(VM(config, self.directory, f"qemu{self._started}"))
        recorded = self.machine.start(paused=paused, incoming=incoming)
        vm.start()
        self.qemu, self.incoming = vm, incoming
        self._compare(f"start(paused={paused}, incoming={incoming})", recorded, vm.qmp.events)

    def quit(self) -> None:
        """Quit QEMU; the process exits after SHUTDOWN."""
        vm = self._live()
        seen = len(vm.qmp.events)
        recorded = self.machine.quit()
        vm.qmp.execute("quit")
        with suppress(ConnectionError):  # QEMU is gone: every event it sent has been read
            emitted(vm, seen, "SHUTDOWN")
        assert wait_until(vm.returncode, SETTLE, "QEMU to exit") == 0
        self.qemu = None
        self._compare("quit()", recorded, vm.qmp.events[seen:])

    def do(self, command: str, *args: Any, **kwargs: Any) -> str | None:
        """Run the machine's ``command`` and the QMP command it models; compare the outcome.

        Returns the text both refused the command with, or None when both accepted it.
        """
        vm = self._live()
        seen = len(vm.qmp.events)
        shown = [*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())]
        step = f"{command}({', '.join(shown)})"
        refused: list[str | None] = [None, None]
        recorded: tuple[Event, ...] = ()
        try:
            recorded = getattr(self.machine, command)(*args, **kwargs)
        except IllegalTransition as exc:
            refused[0] = exc.verdict.error
        try:
            qmp_step(vm, seen, command, *args, **kwargs)
        except QMPError as exc:
            refused[1] = exc.desc
        assert refused[0] == refused[1], (
            f"step {len(self._steps) + 1} {step}: machine refusal {refused[0]!r}, "
            f"QEMU {refused[1]!r}"
        )
        self._compare(step, recorded, vm.qmp.events[seen:])
        return refused[0]

    def _live(self) -> VM:
        assert self.qemu is not None, "no QEMU is running"
        return self.qemu

    def _compare(self, step: str, recorded: tuple[Event, ...], events: list[JSON]) -> None:
        self._steps.append(step)
        where = f"step {len(self._steps)} {step} (after {' -> '.join(self._steps[:-1])})"
        mine, theirs = machine_labels(recorded), qemu_labels(events)
        assert mine == theirs, f"{where}: events differ\n  machine {mine}\n  QEMU    {theirs}"
        for event in recorded:
            if isinstance(event, ev.MigrationStatusReported) and event.status == "failed":
                self._error = event.error
        state = self.machine.state
        if self.qemu is None:
            assert (state.runstate, self.machine.runstate) == (None, None), where
            return
        runstate = self.qemu.runstate()
        assert (state.runstate, self.machine.runstate) == (runstate, runstate), (
            f"{where}: runstate differs: machine {state.runstate!r} "
            f"(live {self.machine.runstate!r}), QEMU {runstate!r}"
        )
        info = self.qemu.migration()
        status = state.incoming_status if self.incoming else state.outgoing_status
        side = "incoming" if self.incoming else "outgoing"
        assert status == status_of(info), (
            f"{where}: {side} migration status differs: machine {status!r}, "
            f"QEMU {status_of(info)!r}"
        )
        if status == "failed":
            assert self._error == info.get("error-desc"), (
                f"{where}: error differs: machine {self._error!r}, QEMU {info.get('error-desc')!r}"
            )


def qmp_step(vm: VM, seen: int, command: str, *args: Any, **kwargs: Any) -> None:
    """Issue on QEMU what the machine's ``command`` models, then wait until QEMU settles."""
    execute: Callable[..., Any] = vm.qmp.execute
    if command in {"stop", "cont"}:
        execute(command)  # synchronous: STOP / RESUME precede the reply
    elif command == "guest_suspend":
        emitted(vm, seen, "SUSPEND")  # the SUSPEND guest enters S3 by itself
    elif command == "system_wakeup":
        execute(command)
        emitted(vm, seen, "WAKEUP")  # the main loop emits WAKEUP after the reply
    elif command == "set_capabilities":
        (changes,) = args
        caps = [{"capability": name, "state": on} for name, on in changes.items()]
        execute("migrate-set-capabilities", capabilities=caps)
    elif command == "set_parameters":
        execute("migrate-set-parameters", **kwargs)
    elif command == "migrate_incoming":
        execute("migrate-incoming", uri=args[0])

        def ended() -> str | None:
            status = status_of(vm.migration())
            return status if status in INCOMING_DONE else None

        done = wait_until(ended, SETTLE, "the incoming migration")
        emitted(vm, seen, f"MIGRATION {done}")
    else:
        if command == "migrate":
            execute("migrate", uri=args[0])
        elif command == "migrate_continue":
            execute("migrate-continue", state="pre-switchover")
            with suppress(TimeoutError):  # pre-switchover counts as settled: let it go first
                wait_until(
                    lambda: True if status_of(vm.migration()) != "pre-switchover" else None,
                    SETTLE,
                    "the migration to leave pre-switchover",
                )
        else:
            execute(command)  # migrate_cancel
        # The migration thread may change the status just before it emits the event.
        emitted(vm, seen, f"MIGRATION {status_of(settle_migration(vm, SETTLE))}")


@pytest.fixture
def pair() -> Iterator[Differential]:
    """A machine and the QEMU processes it is compared with, all killed afterwards."""
    with workdir() as directory, ExitStack() as stack:
        yield Differential(directory, stack)


def save_quit(pair: Differential) -> None:
    """cpr-reboot the current QEMU to the state file, then quit it."""
    pair.do("set_capabilities", EVENTS)
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate", pair.uri)
    pair.quit()


def restore(pair: Differential, guest: Guest = Guest.LOOP, *, paused: bool = False) -> None:
    """Start QEMU with -incoming defer, set cpr-reboot and load the state file."""
    pair.start(guest, paused=paused, incoming=True)
    pair.do("set_capabilities", EVENTS)
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate_incoming", pair.uri)


def start_suspended(pair: Differential) -> None:
    """Boot the SUSPEND guest from -S, so that S3 cannot race the first comparisons."""
    pair.start(Guest.SUSPEND, paused=True)
    pair.do("cont")
    pair.do("guest_suspend")


def test_cpr_reboot_running_guest(pair: Differential) -> None:
    """cpr-reboot of a running guest to file:, quit, and a -incoming defer QEMU runs it."""
    pair.start()
    save_quit(pair)
    restore(pair)
    assert pair.machine.state.runstate == "running"


def test_cpr_reboot_paused_guest(pair: Differential) -> None:
    """cpr-reboot of a paused guest: no STOP at the save, and the destination ends paused."""
    pair.start()
    pair.do("stop")
    save_quit(pair)
    restore(pair)
    assert pair.machine.state.runstate == "paused"


def test_normal_migration_then_cont_on_the_source(pair: Differential) -> None:
    """Normal mode to file: stops at switchover; cont then runs the source from postmigrate."""
    pair.start()
    pair.do("set_capabilities", EVENTS)
    pair.do("migrate", pair.uri)
    pair.do("cont")
    assert (pair.machine.state.runstate, pair.machine.state.outgoing_status) == (
        "running",
        "completed",
    )


def test_cpr_reboot_suspended_guest_then_wakeup(pair: Differential) -> None:
    """A suspended guest arrives suspended (RESUME); system_wakeup then runs it (WAKEUP)."""
    start_suspended(pair)
    save_quit(pair)
    restore(pair, Guest.SUSPEND)
    assert pair.machine.state.runstate == "suspended"
    pair.do("system_wakeup")
    assert pair.machine.state.runstate == "running"


def test_paused_destination_then_cont(pair: Differential) -> None:
    """A destination started with -S ends paused; cont runs it (RESUME)."""
    pair.start()
    save_quit(pair)
    restore(pair, paused=True)
    assert pair.machine.state.runstate == "paused"
    pair.do("cont")
    assert pair.machine.state.runstate == "running"


@pytest.mark.parametrize("mode", ["cpr-reboot", "normal"])
def test_pause_before_switchover_then_cancel(pair: Differential, mode: str) -> None:
    """migrate stops in pre-switchover; migrate_cancel resumes the guest and cancels."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"pause-before-switchover": True})
    pair.do("set_parameters", mode=mode)
    pair.do("migrate", pair.uri)
    assert pair.machine.state.outgoing_status == "pre-switchover"
    pair.do("migrate_cancel")
    assert pair.machine.state.runstate == "running"


@pytest.mark.parametrize("mode", ["cpr-reboot", "normal"])
def test_pause_before_switchover_then_continue(pair: Differential, mode: str) -> None:
    """migrate stops in pre-switchover; migrate-continue goes on to device and completed."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"pause-before-switchover": True})
    pair.do("set_parameters", mode=mode)
    pair.do("migrate", pair.uri)
    assert pair.machine.state.outgoing_status == "pre-switchover"
    pair.do("migrate_continue")
    assert pair.machine.state.runstate == "postmigrate"


def test_return_path_on_file_fails_at_completion(pair: Differential) -> None:
    """return-path on file: in cpr-reboot fails after the STOP; the guest runs again."""
    pair.start()
    pair.do("set_capabilities", EVENTS | {"return-path": True})
    pair.do("set_parameters", mode="cpr-reboot")
    pair.do("migrate", pair.uri)
    assert (pair.machine.state.runstate, pair.machine.state.outgoing_status) == (
        "running",
        "failed",
    )


def test_stop_and_cont_a_suspended_guest(pair: Differential) -> None:
    """stop pauses a suspended guest, system_wakeup is refused alike, cont gives suspended."""
    start_suspended(pair)
    pair.do("stop")
    refusal = pair.do("system_wakeup")
    assert refusal == "Unable to wake up: guest is not in suspended state"
    pair.do("cont")
    assert pair.machine.state.runstate == "suspended"
    pair.do("system_wakeup")
    assert pair.machine.state.runstate == "running"
