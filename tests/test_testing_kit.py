"""The pytest-free test kit: its strategies come from the model and drive the real API."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cprfsm import (
    CommandFailed,
    Configuration,
    IllegalTransition,
    InMemoryStore,
    QemuAbortPredicted,
    UsageError,
    VirtualMachine,
    check,
    load_model,
    replay,
)
from cprfsm.testing import (
    DEFAULT_URIS,
    RecordingPorts,
    capture_transitions,
    command_sequences,
    commands,
    configurations,
)

MODEL = load_model("10.0")


@settings(max_examples=150, deadline=None)
@given(configurations(model=MODEL))
def test_every_generated_configuration_gets_a_verdict(config: Configuration) -> None:
    """check() answers each configuration the strategy draws, for every command."""
    for command in ("migrate", "migrate-incoming", "cont", "start"):
        verdict = check(config, command, model=MODEL)
        assert verdict.qemu == "10.0"


@settings(max_examples=200, deadline=None)
@given(commands(model=MODEL))
def test_commands_name_machine_methods_and_model_names(step: tuple[str, dict[str, Any]]) -> None:
    """Each command is a VirtualMachine method, with the model's names as arguments."""
    method, arguments = step
    assert callable(getattr(VirtualMachine, method))
    assert set(arguments.get("changes", {})) <= set(MODEL.capabilities)
    assert arguments.get("mode", "normal") in {mode.name for mode in MODEL.modes}
    assert arguments.get("uri", DEFAULT_URIS[0]) in DEFAULT_URIS


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_command_sequences_drive_a_recording_vm_and_replay_matches(data: st.DataObject) -> None:
    """A drawn sequence runs on a VM over RecordingPorts; the log replays to the live state."""
    store, ports = InMemoryStore(), RecordingPorts()
    vm = VirtualMachine("vm", store=store, executor=ports.executor(), qemu="10.0")
    with capture_transitions() as transitions:
        for method, arguments in data.draw(command_sequences(model=MODEL, max_size=15)):
            # After upgrade_qemu a name of 10.0 may be unknown to the new release: UsageError.
            with contextlib.suppress(
                IllegalTransition, UsageError, CommandFailed, QemuAbortPredicted
            ):
                getattr(vm, method)(**arguments)
    assert replay("vm", [r.event for r in store.read("vm")], qemu="10.0") == vm.state
    assert all(entry["event"].startswith("transition.") for entry in transitions)
