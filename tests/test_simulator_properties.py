"""Hypothesis drives the machine on the real simulator: lost RAM is always announced first."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from cprfsm import IllegalTransition, UsageError
from cprfsm import vm_events as ev
from cprfsm.exceptions import CommandFailed, PortError, QemuAbortPredicted
from cprfsm.executor import VmDefinition
from cprfsm.machine import VirtualMachine
from cprfsm.simulator import Simulator
from cprfsm.store import InMemoryStore

if TYPE_CHECKING:
    from cprfsm.events import Event

RAM = 4 * 2**20
COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("start", {}),
    ("start", {"incoming": True}),
    ("quit", {}),
    ("reboot_host", {}),
    ("guest_suspend", {}),
    ("system_wakeup", {}),
    ("cont", {}),
]


class SimulatedLifecycle(RuleBasedStateMachine):
    """One VM on real memory and files, under random saves, restores, quits and reboots."""

    def __init__(self) -> None:
        """A fresh folder with a persistent and a volatile part."""
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="cprfsm-simprop-"))
        self.simulator = Simulator(self.root / "sim", volatile=lambda p: "/volatile/" in p)
        self.store = InMemoryStore()
        self.vm: VirtualMachine | None = None
        self.seed = 0
        self.saved: dict[str, str] = {}
        self.ignore_shared: dict[str, bool] = {}

    @precondition(lambda self: self.vm is None)
    @rule(place=st.sampled_from(["persistent", "volatile", "memfd", "ram"]))
    def create(self, place: str) -> None:
        """Define the VM's RAM: a persistent or volatile file, memfd or anonymous memory."""
        memory = {"memfd": "memfd,share=on", "ram": "ram"}.get(
            place, f"file,share=on,path={self.root / place / 'guest-ram'}"
        )
        (self.root / "persistent").mkdir(exist_ok=True)
        (self.root / "volatile").mkdir(exist_ok=True)
        self.vm = VirtualMachine(
            "vm",
            store=self.store,
            executor=self.simulator.executor(),
            definition=VmDefinition(memory=memory, ram_size=RAM),
            qemu="10.0",
        )

    @precondition(lambda self: self.vm is not None)
    @rule(command=st.sampled_from(COMMANDS))
    def act(self, command: tuple[str, dict[str, Any]]) -> None:
        """A lifecycle command; a fresh boot makes the guest write new RAM."""
        assert self.vm is not None
        name, arguments = command
        before = self.vm.state.version
        self.run(name, arguments)
        if name == "start" and not arguments and self.vm.state.version > before:
            self.seed += 1
            self.simulator.guest_write(b"generation", seed=self.seed)

    @precondition(lambda self: self.vm is not None)
    @rule(
        place=st.sampled_from(["persistent", "volatile"]),
        ignore_shared=st.booleans(),
        restore=st.booleans(),
    )
    def cycle_step(self, place: str, ignore_shared: bool, restore: bool) -> None:
        """A cpr-reboot save (or restore) to a state file on either filesystem."""
        assert self.vm is not None
        uri = f"file:{self.root / place / 'vm.state'}"
        if restore:  # restore with the setting the save used (a mismatch is tested elsewhere)
            ignore_shared = self.ignore_shared.get(uri, ignore_shared)
            self.run("start", {"incoming": True})
        self.run("set_parameters", {"mode": "cpr-reboot"})
        self.run("set_capabilities", {"changes": {"x-ignore-shared": ignore_shared}})
        before = self.vm.state.version
        self.run("migrate_incoming" if restore else "migrate", {"uri": uri})
        recorded = (
            [r.event for r in self.store.read("vm", first=before + 1)]
            if (self.vm.state.version > before)
            else []
        )
        if not restore and any(isinstance(e, ev.StateFileWritten) for e in recorded):
            self.saved[uri] = self.simulator.ram_digest()
            self.ignore_shared[uri] = ignore_shared
        completed = any(
            isinstance(e, ev.MigrationStatusReported)
            and e.side == "incoming"
            and e.status == "completed"
            for e in recorded
        )
        if restore and completed and uri in self.saved:
            self.check_restore(uri, recorded)

    def check_restore(self, uri: str, recorded: list[Event]) -> None:
        """RAM equal to the saved RAM, or a GuestDataLost that names earlier hazards."""
        lost = [e for e in recorded if isinstance(e, ev.GuestDataLost)]
        if self.simulator.ram_digest() == self.saved[uri]:
            event("restore: RAM intact")
            assert not lost, "a loss was reported although the RAM came back"
            return
        event("restore: RAM lost")
        assert lost, f"RAM restored from {uri} differs from the save and nothing says so"
        log = [r.event for r in self.store.read("vm")]
        assert lost[0].hazards, "RAM was lost with no hazard reported before"
        for version in lost[0].hazards:
            assert isinstance(log[version - 1], ev.HazardReported)

    def run(self, name: str, arguments: dict[str, Any]) -> None:
        """Run a command, accepting QEMU's refusals and failures as outcomes."""
        assert self.vm is not None
        with contextlib.suppress(
            IllegalTransition, UsageError, CommandFailed, QemuAbortPredicted, PortError
        ):
            getattr(self.vm, name)(**arguments)

    def teardown(self) -> None:
        """Unmap guest RAM and delete the folder."""
        self.simulator.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestSimulatedLifecycle = SimulatedLifecycle.TestCase
TestSimulatedLifecycle.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
