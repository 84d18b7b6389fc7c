"""Every command from every reachable faithful state of small configurations."""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import attrs
import pytest

from cprfsm import IllegalTransition, load_model
from cprfsm.exceptions import CommandFailed, QemuAbortPredicted
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import VmState, replay
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.store import InMemoryStore

URI = "file:/var/lib/vm.state"
Command = tuple[str, tuple[tuple[str, Any], ...]]
COMMANDS: list[Command] = [
    ("start", ()),
    ("start", (("paused", True),)),
    ("start", (("incoming", True),)),
    ("cont", ()),
    ("stop", ()),
    ("guest_suspend", ()),
    ("system_wakeup", ()),
    ("guest_reset", ()),
    ("quit", ()),
    ("reboot_host", ()),
    ("migrate", (("uri", URI),)),
    ("migrate_incoming", (("uri", URI),)),
    ("migrate_continue", ()),
    ("migrate_cancel", ()),
    ("set_parameters", (("mode", "cpr-reboot"),)),
    ("set_capabilities", (("changes", {"x-ignore-shared": True}),)),
    ("set_capabilities", (("changes", {"pause-before-switchover": True}),)),
]
CONFIGURATIONS = {
    "plain RAM": VmDefinition(),
    "pmem file and VFIO": VmDefinition(
        memory="file,share=on,path=/mnt/pmem/ram", devices=("vfio",)
    ),
}
MAX_STATES = 150


def build(
    definition: VmDefinition, qemu: str, path: list[Command]
) -> tuple[VirtualMachine, InMemoryStore, RecordingPorts]:
    """A fresh VM driven through ``path``."""
    store, ports = InMemoryStore(), RecordingPorts()
    vm = VirtualMachine(
        "vm", store=store, executor=ports.executor(), definition=definition, qemu=qemu
    )
    for command in path:
        run(vm, command)
    return vm, store, ports


def run(vm: VirtualMachine, command: Command) -> None:
    """Run one command, accepting QEMU's refusals and failures as outcomes."""
    name, arguments = command
    with contextlib.suppress(IllegalTransition, CommandFailed, QemuAbortPredicted):
        getattr(vm, name)(**dict(arguments))


def key(state: VmState) -> VmState:
    """The state without counters that only grow (so the search ends)."""
    return attrs.evolve(state, version=0, incarnation=0, host_boot=0)


@pytest.mark.parametrize("qemu", ["8.2", "9.0", "10.0"])
@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_every_command_from_every_reachable_state(configuration: str, qemu: str) -> None:
    """Refusals change nothing; accepted commands fold to the live state through the table."""
    definition = CONFIGURATIONS[configuration]
    model = load_model(qemu)
    seen = {key(build(definition, qemu, [])[0].state)}
    queue: deque[list[Command]] = deque([[]])
    pairs = 0
    while queue:
        path = queue.popleft()
        for command in COMMANDS:
            vm, store, ports = build(definition, qemu, path)
            before, calls = vm.state, len(ports.calls)
            name, arguments = command
            try:
                events = getattr(vm, name)(**dict(arguments))
            except IllegalTransition:
                assert vm.state == before, command
                assert len(ports.calls) == calls, command
                assert store.version("vm") == before.version, command
                continue
            except (CommandFailed, QemuAbortPredicted) as exc:
                events = exc.events
            pairs += 1
            after = vm.state
            assert after.version == before.version + len(events)
            assert replay("vm", (r.event for r in store.read("vm")), qemu=qemu) == after
            if before.runstate is not None and after.runstate is not None:
                release = load_model(after.qemu_version) if after.qemu_version else model
                assert release.may_change_runstate(before.runstate, after.runstate) or any(
                    type(e).__name__ in {"VmStopped", "RunstateSet"} for e in events
                ), (before.runstate, after.runstate, command)
            assert vm.runstate == after.runstate
            if key(after) not in seen and len(seen) < MAX_STATES:
                seen.add(key(after))
                queue.append([*path, command])
    assert len(seen) > 20
    assert pairs > len(seen)
