"""The configurations ("cells") of the golden legality matrix."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .launcher import MEMORY_KINDS

# query-migrate-capabilities order of QEMU 10.0 (22 entries); checked live by the tests.
CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)
MODES = ("normal", "cpr-reboot", "cpr-transfer")
STOPPED_RUNSTATES = ("prelaunch", "paused", "suspended", "postmigrate", "inmigrate")
RUNSTATE_CAPS = (
    "x-ignore-shared",
    "postcopy-ram",
    "background-snapshot",
    "x-colo",
    "mapped-ram",
    "multifd",
)
# The identifying CSV columns of a cell, in column order.
Key = tuple[str, str, str, str, str, str, str, str]
BLOCK_FORMATS = ("qcow", "vdi", "vmdk", "vpc", "vhdx", "parallels", "qcow2")


@dataclass(frozen=True)
class Cell:
    """One configuration: a VM in a starting runstate and the migration request sent to it."""

    runstate: str
    mode: str
    caps: tuple[str, ...]
    transport: str
    cpr_channel: str = ""
    memory: str = "ram"
    aux_ram_share: bool = False
    device: str = ""

    def key(self) -> Key:
        """Return the cell's identifying CSV columns, in column order."""
        return (
            self.runstate,
            self.mode,
            "+".join(sorted(self.caps)),
            self.transport,
            self.cpr_channel,
            self.memory,
            "true" if self.aux_ram_share else "false",
            self.device,
        )


def running_caps_cells() -> list[Cell]:
    """Group A: a running VM, every mode, no/one/two capabilities, file: and exec:."""
    cap_sets = [(), *((cap,) for cap in CAPABILITIES), *itertools.combinations(CAPABILITIES, 2)]
    return [
        Cell("running", mode, caps, transport)
        for mode in MODES
        for caps in cap_sets
        for transport in ("file", "exec")
    ]


def runstate_cells() -> list[Cell]:
    """Group B: the non-running starting runstates with selected single capabilities."""
    cap_sets = [(), *((cap,) for cap in RUNSTATE_CAPS)]
    return [
        Cell(runstate, mode, caps, "file")
        for runstate in STOPPED_RUNSTATES
        for mode in MODES
        for caps in cap_sets
    ]


def block_format_cells() -> list[Cell]:
    """Group C: an extra disk in each local image format (qcow2 is the control)."""
    return [
        Cell("running", mode, (), "file", device=fmt) for fmt in BLOCK_FORMATS for mode in MODES
    ]


def memory_cells() -> list[Cell]:
    """Group D: memory backends x aux-ram-share, on file: and (cpr-transfer) unix sockets."""
    cells = []
    for memory, aux, caps in itertools.product(
        MEMORY_KINDS, (False, True), ((), ("x-ignore-shared",))
    ):
        cells += [Cell("running", mode, caps, "file", "", memory, aux) for mode in MODES]
        cells += [
            Cell("running", "cpr-transfer", caps, "unix", cpr, memory, aux) for cpr in ("unix", "")
        ]
    return cells


def all_cells() -> list[Cell]:
    """Every cell of the golden matrix, deduplicated and sorted by key."""
    unique = {
        cell.key(): cell
        for cell in running_caps_cells() + runstate_cells() + block_format_cells() + memory_cells()
    }
    return [unique[key] for key in sorted(unique)]
