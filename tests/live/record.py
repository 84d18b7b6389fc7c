"""Record the golden legality matrix from live QEMU.

Usage: python -m tests.live.record --out tests/golden/qemu-10.0.2.csv [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from .cells import Cell, Key, all_cells
from .launcher import (
    ACCEL,
    MACHINE,
    RAM_SIZE,
    VM,
    config_for,
    dump_json,
    enter_runstate,
    qemu_version,
    settle_migration,
    unix_channel,
    unix_listening,
    wait_until,
    workdir,
)
from .qmp import JSON, QMPError

# Long enough for any of these 32 MiB migrations to finish many times over; cells still
# moving after it (a return path over exec:, switchover-ack waiting for an ack) are
# recorded in the status they are stuck in.
DEFAULT_SETTLE_TIMEOUT = 5.0
# status and runstate_after of a cell during which QEMU died (e.g. abort() on an
# invalid runstate transition).
ABORTED = "aborted"


def _bool(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class Outcome:
    """What QEMU answered to one cell; `failed_at` is empty when nothing failed."""

    failed_at: str
    asynchronous: bool
    error: str
    status: str
    runstate_after: str

    def columns(self) -> tuple[str, str, str, str, str, str]:
        """Return the outcome CSV columns, allowed first."""
        return (
            _bool(not self.failed_at),
            self.failed_at,
            _bool(self.asynchronous),
            self.error,
            self.status,
            self.runstate_after,
        )


@dataclass(frozen=True)
class Row:
    """One line of the golden CSV; every field is the exact text written."""

    runstate: str
    mode: str
    caps: str
    transport: str
    cpr_channel: str
    memory: str
    aux_ram_share: str
    device: str
    allowed: str
    failed_at: str
    asynchronous: str
    error: str
    status: str
    runstate_after: str

    @classmethod
    def of(cls, cell: Cell, outcome: Outcome) -> Row:
        """Join a cell's identifying columns with what QEMU answered."""
        return cls(*cell.key(), *outcome.columns())

    def key(self) -> Key:
        """Return the identifying columns (the same tuple as `Cell.key`)."""
        return (
            self.runstate,
            self.mode,
            self.caps,
            self.transport,
            self.cpr_channel,
            self.memory,
            self.aux_ram_share,
            self.device,
        )


COLUMNS = tuple(field.name for field in fields(Row))


def migrate_arguments(cell: Cell, directory: Path) -> JSON:
    """Return the `migrate` arguments for the cell's transport."""
    if cell.transport == "file":
        return {"uri": f"file:{directory / 'state'}"}
    if cell.transport == "exec":
        return {"uri": f"exec:cat > {directory / 'state'}"}
    channels = [unix_channel("main", directory / "main.sock")]
    if cell.cpr_channel:
        channels.append(unix_channel("cpr", directory / "cpr.sock"))
    return {"channels": channels}


def _start_destination(source: VM, cell: Cell, stack: ExitStack) -> VM:
    """Start the incoming QEMU of a unix-socket migration and wait until it listens.

    With a cpr channel it follows CPR.rst's "incoming defer" recipe: the new QEMU reads the
    cpr channel first and only then opens its monitor; `_accept_cpr_transfer` finishes it.
    Without one it is a plain destination listening on the main socket.
    """
    if cell.cpr_channel:
        incoming = ["defer", dump_json(unix_channel("cpr", source.workdir / "cpr.sock"))]
        listen_on = source.workdir / "cpr.sock"
    else:
        incoming = [dump_json(unix_channel("main", source.workdir / "main.sock"))]
        listen_on = source.workdir / "main.sock"
    config = config_for("running", memory=cell.memory, aux_ram_share=cell.aux_ram_share)
    destination = stack.enter_context(VM(config.with_incoming(*incoming), source.workdir, "dest"))
    destination.start(connect=False)
    wait_until(lambda: unix_listening(listen_on), 20.0, "the destination to listen")
    return destination


def _accept_cpr_transfer(source: VM, destination: VM, steps: list[tuple[str, JSON]]) -> None:
    """After the source's `migrate`: give the destination the same mode and caps, then start it.

    The destination's monitor appears once it has read the cpr channel; if the source fails
    before sending it, there is nothing to accept.
    """

    def monitor_or_failure() -> bool | None:
        if destination.qmp_path.exists():
            return True
        return False if source.migration().get("status") == "failed" else None

    if not wait_until(monitor_or_failure, 20.0, "the cpr-transfer destination monitor"):
        return
    destination.connect()
    for command, arguments in steps[:-1]:
        destination.qmp.execute(command, **arguments)
    main = unix_channel("main", source.workdir / "main.sock")
    destination.qmp.execute("migrate-incoming", channels=[main])


def cell_steps(cell: Cell, directory: Path) -> list[tuple[str, JSON]]:
    """Return the cell's QMP sequence: mode, then its capabilities (if any), then `migrate`."""
    steps: list[tuple[str, JSON]] = [("migrate-set-parameters", {"mode": cell.mode})]
    if cell.caps:
        caps = [{"capability": cap, "state": True} for cap in cell.caps]
        steps.append(("migrate-set-capabilities", {"capabilities": caps}))
    steps.append(("migrate", migrate_arguments(cell, directory)))
    return steps


def run_cell(cell: Cell, settle_timeout: float = DEFAULT_SETTLE_TIMEOUT) -> Row:
    """Run the cell's QMP sequence on a fresh QEMU and return what QEMU answered."""
    with workdir() as directory, ExitStack() as stack:
        config = config_for(
            cell.runstate,
            memory=cell.memory,
            aux_ram_share=cell.aux_ram_share,
            device=cell.device,
        )
        vm = stack.enter_context(VM(config, directory)).start()
        enter_runstate(vm, cell.runstate)
        destination = _start_destination(vm, cell, stack) if cell.transport == "unix" else None
        steps = cell_steps(cell, directory)
        failed_at = error = ""
        try:
            for command, arguments in steps:
                try:
                    vm.qmp.execute(command, **arguments)
                except QMPError as exc:
                    failed_at, error = command, exc.desc
                    break
            if destination is not None and cell.cpr_channel and not failed_at:
                _accept_cpr_transfer(vm, destination, steps)
            info = settle_migration(vm, settle_timeout)
            runstate_after = vm.runstate()
        except ConnectionError:
            return _aborted_row(cell, vm, steps, directory)
        status = str(info.get("status", "none"))
        asynchronous = not failed_at and status == "failed"
        if asynchronous:
            failed_at, error = "migrate", str(info.get("error-desc", ""))
        error = error.replace(str(directory), "{dir}")
        return Row.of(cell, Outcome(failed_at, asynchronous, error, status, runstate_after))


def _aborted_row(cell: Cell, vm: VM, steps: list[tuple[str, JSON]], directory: Path) -> Row:
    """Describe a QEMU that died during the cell: its last words, status `aborted`.

    Dying while one of the cell's commands waited for its reply counts against that
    command; dying later (while the migration ran) counts against `migrate`, asynchronously.
    """
    wait_until(vm.returncode, 20.0, "QEMU to exit after closing QMP")
    message = vm.messages()[-1]
    in_reply = any(command == vm.qmp.pending for command, _ in steps)
    failed_at = vm.qmp.pending if in_reply and vm.qmp.pending else "migrate"
    error = message.replace(str(directory), "{dir}")
    return Row.of(cell, Outcome(failed_at, not in_reply, error, ABORTED, ABORTED))


def record(
    cells: list[Cell],
    jobs: int = 2,
    settle_timeout: float = DEFAULT_SETTLE_TIMEOUT,
    *,
    progress: bool = False,
) -> list[Row]:
    """Run every cell (each on its own QEMU, `jobs` at a time); return rows sorted by key."""
    rows: list[Row] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(lambda cell: run_cell(cell, settle_timeout), cells):
            rows.append(row)
            if progress and len(rows) % 100 == 0:
                sys.stderr.write(f"{len(rows)}/{len(cells)} cells\n")
    return sorted(rows, key=Row.key)


def write_csv(rows: list[Row], path: Path) -> None:
    """Write rows with a header, one row per cell, in the order given."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(astuple(row) for row in rows)


def read_csv(path: Path) -> list[Row]:
    """Read a golden CSV back into rows (the header must match COLUMNS)."""
    with path.open(newline="", encoding="utf-8") as src:
        reader = csv.reader(src)
        header = tuple(next(reader))
        if header != COLUMNS:
            raise ValueError(f"{path}: header {header} is not {COLUMNS}")
        return [Row(*line) for line in reader]


# Capabilities whose migrate-set-capabilities answer depends on the build or the host, and
# the runstate where QEMU checks it: replication module, userfaultfd write-protect,
# userfaultfd (checked on a destination only), KVM dirty ring.
HOST_PROBES = {
    "x-colo": "running",
    "background-snapshot": "running",
    "postcopy-ram": "inmigrate",
    "dirty-limit": "running",
}


def host_facts(rows: list[Row], wall_time: float, jobs: int, settle: float) -> dict[str, Any]:
    """Return the facts about this host and QEMU build that the recorded rows depend on."""
    probe_keys = {
        (runstate, "normal", cap, "file", "", "ram", "false", "")
        for cap, runstate in HOST_PROBES.items()
    }
    probes = {}
    for row in rows:
        if row.key() in probe_keys:
            refused = row.failed_at == "migrate-set-capabilities"
            probes[f"{row.caps} in {row.runstate}"] = row.error if refused else "accepted"
    with workdir() as directory, VM(config_for("running"), directory) as vm:
        vm.start()
        package = vm.qmp.execute("query-version")["package"]
        caps = [cap["capability"] for cap in vm.qmp.execute("query-migrate-capabilities")]
    uffd_sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    return {
        "qemu_version": qemu_version(),
        "qemu_package": package,
        "machine": MACHINE,
        "accel": ACCEL,
        "ram": RAM_SIZE,
        "migration_capabilities": caps,
        "set_capabilities_probes": dict(sorted(probes.items())),
        "kernel": platform.release(),
        "euid": os.geteuid(),
        "unprivileged_userfaultfd": (
            uffd_sysctl.read_text().strip() if uffd_sysctl.exists() else None
        ),
        "dev_userfaultfd_present": Path("/dev/userfaultfd").exists(),
        "cpus": os.cpu_count(),
        "jobs": jobs,
        "settle_timeout_s": settle,
        "cells": len(rows),
        "wall_time_s": round(wall_time, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Record every cell and write the CSV plus the `-host.json` facts next to it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--jobs", type=int, default=2, help="QEMU processes run at once")
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=DEFAULT_SETTLE_TIMEOUT,
        help="seconds to wait for a migration to settle",
    )
    args = parser.parse_args(argv)
    cells = all_cells()
    started = time.monotonic()
    rows = record(cells, args.jobs, args.settle_timeout, progress=True)
    wall = time.monotonic() - started
    write_csv(rows, args.out)
    facts = host_facts(rows, wall, args.jobs, args.settle_timeout)
    host_path = args.out.with_name(f"{args.out.stem}-host.json")
    host_path.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    sys.stderr.write(f"{len(rows)} rows in {wall:.1f}s -> {args.out}, {host_path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
