"""Randomised differential test: random command sequences on the machine and a live QEMU.

A hypothesis rule-based machine drives :class:`cprfsm.machine.VirtualMachine` with the
shipped QMP executor through random sequences of runstate commands, capability sets,
modes, ``file:`` and ``exec:`` URIs, cancel, continue, quit and restarts with
``-incoming defer``.  Every step goes through ``tests/live/drive.py``: the step must
record no ``model.diverged`` (events, runstate, status and error all as predicted), the
runstate must equal ``query-status``, and a command the model refuses must be refused
by QEMU with the same text.  ``CPRFSM_RANDOM_EXAMPLES`` sets the number of sequences
(default 40, each of 8 to 16 steps, so that CI stays within minutes);
``CPRFSM_RANDOM_LOG`` names a file that gets one line per sequence: steps run, steps
refused, and how many migrations ended in each status, per side.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live.drive import Driven, Refused

from cprfsm import vm_events as ev
from cprfsm.exceptions import QemuAbortPredicted, UsageError
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import rebuild

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]

EXAMPLES = int(os.environ.get("CPRFSM_RANDOM_EXAMPLES", "40"))
CAPABILITIES = (
    "events",
    "return-path",
    "pause-before-switchover",
    "x-ignore-shared",
    "postcopy-ram",
    "multifd",
    "auto-converge",
    "validate-uuid",
    "background-snapshot",
)
MEMORY = ("ram", "file,share=on", "memfd,share=on")


MODES = ("normal", "cpr-reboot")
ENDS = frozenset({"completed", "failed", "cancelled", "pre-switchover", "device"})
RUNNING = (
    "restore",
    "stop",
    "cont",
    "migrate_cancel",
    "migrate_continue",
    "capabilities",
    "mode",
    "migrate",
    "migrate_incoming",
    "quit",
)
STEP = st.tuples(
    st.sampled_from(RUNNING),
    st.booleans(),
    st.dictionaries(st.sampled_from(CAPABILITIES), st.booleans(), min_size=1, max_size=3),
    st.sampled_from(MODES),
    st.sampled_from(["file", "exec"]),
    st.sampled_from(["a", "b"]),
)


class Sequence:
    """One random sequence on one VM: the steps it ran and the ones both sides refused."""

    def __init__(self, directory: Path, memory: str) -> None:
        """Define the VM: 32 MiB of guest RAM on ``memory``."""
        if memory.startswith("file"):
            memory += f",path={directory / 'guest-ram'}"
        self.directory = directory
        self.vm = Driven(directory, VmDefinition(memory=memory, ram_size=32 * 2**20))
        self.saved: list[str] = []
        self.ran = 0
        self.refused = 0
        self.ended: Counter[str] = Counter()  # how migrations ended, per side

    def step(self, command: str, *args: Any, **kwargs: Any) -> None:
        """Run one checked step; a shared refusal or a command not performed yet is fine."""
        self.ran += 1
        try:
            events = self.vm.do(command, *args, **kwargs)
            self.ended.update(
                f"{e.side}:{e.status}"
                for e in events
                if isinstance(e, ev.MigrationStatusReported) and e.status in ENDS
            )
        except (Refused, QemuAbortPredicted):
            self.refused += 1
        except UsageError as exc:  # the machine does not perform background snapshots yet
            self.refused += 1
            if "not performed yet" not in str(exc):
                raise
        assert rebuild(self.vm.store, "vm") == self.vm.machine.state, "replay differs from live"

    def play(self, action: tuple[str, bool, dict[str, bool], str, str, str]) -> None:
        """Run ``action``: a start when no QEMU runs, else the command it names."""
        command, flag, changes, mode, transport, name = action
        if not self.vm.machine.state.qemu_running:
            incoming = flag and bool(self.saved)
            self.step("start", paused=flag and not incoming, incoming=incoming)
        elif command == "capabilities":
            self.step("set_capabilities", changes)
        elif command == "mode":
            self.step("set_parameters", mode=mode)
        elif command == "migrate":
            path = self.directory / f"{name}.state"
            self.step("migrate", f"file:{path}" if transport == "file" else f"exec:cat > {path}")
            # Only a file: save is a state file the model can know; what an exec:
            # command writes where is beyond it.
            uri = f"file:{path}"
            written = self.vm.machine.state.state_file(uri) is not None
            if transport == "file" and written and uri not in self.saved:
                self.saved.append(uri)
        elif command == "restore":
            if not self.saved:
                return
            # quit, start with -incoming defer, set the mode (and maybe the capabilities)
            # and load the newest save: what a cpr-reboot restart does
            self.step("quit")
            self.step("start", incoming=True)
            self.step("set_parameters", mode=mode)
            if flag:
                self.step("set_capabilities", changes)
            self.step("migrate_incoming", self.saved[-1])
        elif command == "migrate_incoming":
            choices = [*self.saved, f"file:{self.directory / 'missing.state'}"]
            self.step("migrate_incoming", choices["ab".index(name) % len(choices)])
        else:
            self.step(command)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(memory=st.sampled_from(MEMORY), actions=st.lists(STEP, min_size=8, max_size=16))
def test_random_sequences_agree_with_qemu(
    memory: str, actions: list[tuple[str, bool, dict[str, bool], str, str, str]]
) -> None:
    """Every step of a random sequence: no divergence, same refusals, replay equals live."""
    directory = Path(tempfile.mkdtemp(prefix="cprfsm-r-"))
    sequence = Sequence(directory, memory)
    try:
        for action in actions:
            sequence.play(action)
    finally:
        sequence.vm.close()
        shutil.rmtree(directory, ignore_errors=True)
        log = os.environ.get("CPRFSM_RANDOM_LOG")
        if log:
            with Path(log).open("a", encoding="utf-8") as out:
                ended = " ".join(f"{k}={v}" for k, v in sorted(sequence.ended.items()))
                out.write(f"{sequence.ran} {sequence.refused} {ended}\n")
