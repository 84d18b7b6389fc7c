"""Hypothesis drives the lifecycle machine with any command sequence; QEMU's invariants hold."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cprfsm import IllegalTransition, UsageError, load_model
from cprfsm import vm_events as ev
from cprfsm.exceptions import CommandFailed, QemuAbortPredicted
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import PHASES, replay
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.store import InMemoryStore

URIS = ("file:/var/lib/vm.state", "file:/dev/shm/vm.state")
MEMORY = (
    "ram",
    "memfd,share=on",
    "file,share=on,path=/mnt/pmem/ram0",
    "file,share=on,path=/dev/shm/ram0",
)
FAILURES = (
    None,
    "memory.save",
    "devices.save",
    "memory.load",
    "channel.open_write",
    "stream.commit",
)
CAPABILITIES = ("x-ignore-shared", "postcopy-ram", "pause-before-switchover", "events", "x-colo")

COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("start", {}),
    ("start", {"paused": True}),
    ("start", {"incoming": True}),
    ("start", {"incoming": True, "paused": True}),
    ("cont", {}),
    ("stop", {}),
    ("debug_stop", {}),
    ("guest_suspend", {}),
    ("system_wakeup", {}),
    ("guest_reset", {}),
    ("guest_shutdown", {}),
    ("quit", {}),
    ("reboot_host", {}),
    ("migrate_cancel", {}),
    ("migrate_continue", {}),
    *(("migrate", {"uri": uri}) for uri in URIS),
    *(("migrate_incoming", {"uri": uri}) for uri in URIS),
    *(("set_parameters", {"mode": mode}) for mode in ("normal", "cpr-reboot")),
    *(
        ("set_capabilities", {"changes": {cap: on}})
        for cap in CAPABILITIES
        for on in (True, False)
    ),
    *(("upgrade_qemu", {"version": version}) for version in ("9.0", "10.0")),
]


class Lifecycle(RuleBasedStateMachine):
    """One VM under random commands, injected port failures and host reboots."""

    def __init__(self) -> None:
        """Start with an empty log and recording ports."""
        super().__init__()
        self.store = InMemoryStore()
        self.ports = RecordingPorts()
        self.vm: VirtualMachine | None = None
        self.generation = 0
        self.qemu = "10.0"
        self.saved_ram: dict[str, dict[str, bytes]] = {}

    @precondition(lambda self: self.vm is None)
    @rule(
        memory=st.sampled_from(MEMORY),
        vfio=st.booleans(),
        qemu=st.sampled_from(["8.2", "9.0", "10.0"]),
    )
    def create(self, memory: str, vfio: bool, qemu: str) -> None:
        """Define the VM: its RAM backend, an optional VFIO device, the installed QEMU."""
        definition = VmDefinition(memory=memory, devices=("vfio",) if vfio else ())
        self.qemu = qemu
        self.vm = VirtualMachine(
            "vm",
            store=self.store,
            executor=self.ports.executor(),
            definition=definition,
            qemu=qemu,
        )

    @precondition(lambda self: self.vm is not None)
    @rule(command=st.sampled_from(COMMANDS), failure=st.sampled_from(FAILURES))
    def act(self, command: tuple[str, dict[str, Any]], failure: str | None) -> None:
        """Run one command; a refusal must change nothing and touch no port."""
        assert self.vm is not None
        name, arguments = command
        before, calls, version = self.vm.state, list(self.ports.calls), self.store.version("vm")
        if failure:
            self.ports.fail(failure, "injected failure")
        try:
            getattr(self.vm, name)(**arguments)
        except (IllegalTransition, UsageError):
            assert self.vm.state == before
            assert self.ports.calls == calls
            assert self.store.version("vm") == version
        except (CommandFailed, QemuAbortPredicted):
            pass
        finally:
            self.ports.clear_failures()
        state = self.vm.state
        if state.version == version:
            return
        if name == "start" and not arguments and state.qemu_running:
            self.generation += 1
            self.ports.write_guest(f"generation-{self.generation}".encode())
        if name == "migrate" and state.current_save == arguments["uri"]:
            self.saved_ram[arguments["uri"]] = dict(self.ports.ram)
        if name == "migrate_incoming" and state.incoming_status == "completed":
            self.check_no_silent_loss(arguments["uri"], version)

    def check_no_silent_loss(self, uri: str, before: int) -> None:
        """Restored RAM differs from the saved RAM only if the log warned about it first."""
        if self.ports.ram == self.saved_ram.get(uri):
            return
        log = [r.event for r in self.store.read("vm", last=before)]
        save = max(
            i for i, e in enumerate(log) if isinstance(e, ev.StateFileWritten) and e.uri == uri
        )
        in_place = set(log[save].ram_in_place)  # type: ignore[attr-defined]
        warned = any(
            (isinstance(e, ev.HazardReported) and e.loses_data)
            or (isinstance(e, ev.HostRebooted) and in_place & set(e.lost))
            for e in log[save + 1 :]
        )
        assert warned, f"RAM restored from {uri} differs from what was saved, unannounced"

    @precondition(lambda self: self.vm is not None)
    @rule(uri=st.sampled_from(URIS), ignore_shared=st.booleans(), restore=st.booleans())
    def cycle_step(self, uri: str, ignore_shared: bool, restore: bool) -> None:
        """A whole cpr-reboot save (or restore) as one step, so long stories get explored."""
        steps: list[tuple[str, dict[str, Any]]] = []
        if restore:
            steps.append(("start", {"incoming": True}))
        steps += [
            ("set_parameters", {"mode": "cpr-reboot"}),
            ("set_capabilities", {"changes": {"x-ignore-shared": ignore_shared}}),
            ("migrate_incoming" if restore else "migrate", {"uri": uri}),
        ]
        for step in steps:
            self.act(step, None)

    @invariant()
    def replay_equals_live(self) -> None:
        """Folding the stored log gives exactly the live state."""
        if self.vm is not None:
            events = (recorded.event for recorded in self.store.read("vm"))
            assert replay("vm", events, qemu=self.qemu) == self.vm.state

    @invariant()
    def runstate_changes_follow_the_table(self) -> None:
        """Every runstate change in the log is in the running release's table."""
        runstate: str | None = None
        release = None
        for recorded in self.store.read("vm"):
            event = recorded.event
            if isinstance(event, ev.QemuStarted):
                runstate, release = event.runstate, load_model(event.qemu_version)
                continue
            if isinstance(event, ev.QemuExited):
                runstate = None
                continue
            target = getattr(event, "runstate", None)
            if isinstance(event, ev.GuestSuspended):
                target = "suspended"
            elif isinstance(event, ev.GuestWokeUp):
                target = "running"
            if target is not None and isinstance(
                event,
                (
                    ev.VmStopped,
                    ev.VmResumed,
                    ev.RunstateSet,
                    ev.GuestReset,
                    ev.GuestSuspended,
                    ev.GuestWokeUp,
                ),
            ):
                assert runstate is not None
                assert release is not None
                assert release.may_change_runstate(runstate, target), (runstate, target)
                runstate = target

    @invariant()
    def live_engine_agrees(self) -> None:
        """The transitions machine holds the same runstate as the folded state."""
        if self.vm is not None:
            assert self.vm.runstate == self.vm.state.runstate

    @invariant()
    def phase_is_defined(self) -> None:
        """The five-phase projection is always one of the five."""
        if self.vm is not None:
            assert self.vm.state.phase in PHASES


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(
    max_examples=int(os.environ.get("CPRFSM_EXAMPLES", "150")),
    stateful_step_count=30,
    deadline=None,
)
