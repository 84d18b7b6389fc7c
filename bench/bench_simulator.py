"""Benchmark the simulator's saves and restores, each against an anchor measured in the same run.

Every figure is the median of the repetitions (5 by default); the timed pairs alternate,
and which goes first alternates too.  Saves and restores run through the ports in the
machine's order (open_write, memory.save, devices.save, commit; open_read, header,
memory.load, devices.load), on a disk-backed folder (never tmpfs):

a. save throughput: a 1 GiB ``ram`` guest saved to a state file, against copying the same
   bytes from memory to a new file on the same filesystem with fsync.  Target: >= 0.6x.
b. save time with a shared file backend and x-ignore-shared, 1 GiB against 64 MiB.
   Target: <= 2x.  The same without x-ignore-shared is shown; it grows with RAM.
c. restore time, likewise (a new process maps the RAM before each restore).
d. peak RSS (VmHWM) of a child process that fills and saves a 1 GiB guest.
   Target: <= RAM size + 64 MiB (the interpreter included).

One more line is information, not a target: the memory port's RAM digest, which the
machine computes at every save and restore to detect lost guest data; it reads all RAM,
so a machine-level x-ignore-shared save still costs that one pass.

Run: ``python bench/bench_simulator.py [--reps N] [--dir DIR]`` (needs ~3.5 GiB free).
"""

# ruff: noqa: T201, INP001 - a script that prints, not a package module

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cprfsm.executor import VmDefinition
from cprfsm.ports import Ports, StreamHeader
from cprfsm.simulator import Simulator, on_volatile_filesystem

_MIB = 2**20
_GIB = 2**30
_SMALL = 64 * _MIB
_CHUNK = 8 * _MIB
_HEADROOM = 64 * _MIB
_FREE_NEEDED = 3 * _GIB + _GIB // 2
_IGNORE_SHARED = "x-ignore-shared"


def _header(skip: frozenset[str]) -> StreamHeader:
    return StreamHeader(
        qemu_version="10.0",
        mode="cpr-reboot",
        validated=frozenset({_IGNORE_SHARED}) if skip else frozenset(),
        runstate="running",
        was_suspended=False,
    )


def _skip(ports: Ports) -> frozenset[str]:
    """What the machine skips under x-ignore-shared: shared, named-file blocks."""
    return frozenset(b.name for b in ports.memory.blocks() if b.shared and b.named_file)


def _save(ports: Ports, uri: str, skip: frozenset[str]) -> float:
    started = time.perf_counter()
    writer = ports.channel.open_write(uri, _header(skip))
    ports.memory.save(writer, skip)
    ports.devices.save(writer)
    writer.commit()
    return time.perf_counter() - started


def _restore(ports: Ports, definition: VmDefinition, uri: str, skip: frozenset[str]) -> float:
    ports.host.start_qemu(definition)
    started = time.perf_counter()
    reader = ports.channel.open_read(uri)
    _ = reader.header
    ports.memory.load(reader, skip)
    ports.devices.load(reader)
    return time.perf_counter() - started


def _copy_with_fsync(source: mmap.mmap, path: Path) -> float:
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with memoryview(source) as whole:
            for start in range(0, len(source), _CHUNK):
                with whole[start : start + _CHUNK] as view:
                    done = 0
                    while done < len(view):
                        done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def _filled(size: int) -> mmap.mmap:
    memory = mmap.mmap(-1, size)
    pattern = os.urandom(_MIB) * (_CHUNK // _MIB)
    for start in range(0, size, _CHUNK):
        memory[start : start + _CHUNK] = pattern
    return memory


def _throughput(folder: Path, reps: int) -> tuple[float, float]:
    """(a): median seconds of a 1 GiB save and of the plain copy."""
    sim = Simulator(folder / "a")
    definition = VmDefinition(memory="ram", ram_size=_GIB)
    ports = sim.ports()
    ports.host.start_qemu(definition)
    sim.guest_write(b"bench", seed=1)
    source = _filled(_GIB)
    state, copy = folder / "a.state", folder / "a.copy"
    saves, copies = [], []
    try:
        for rep in range(reps):
            state.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
            if rep % 2:
                copies.append(_copy_with_fsync(source, copy))
                saves.append(_save(ports, f"file:{state}", frozenset()))
            else:
                saves.append(_save(ports, f"file:{state}", frozenset()))
                copies.append(_copy_with_fsync(source, copy))
    finally:
        sim.close()
        source.close()
        state.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
    return statistics.median(saves), statistics.median(copies)


def _scaling(folder: Path, reps: int) -> dict[tuple[str, int, bool], float]:
    """(b), (c): median save and restore seconds per (kind, RAM size, x-ignore-shared)."""
    times: dict[tuple[str, int, bool], list[float]] = {}
    sims = {}
    for size in (_SMALL, _GIB):
        sim = Simulator(folder / f"b{size}")
        definition = VmDefinition(memory="file,share=on", ram_size=size)
        sim.ports().host.start_qemu(definition)
        sim.guest_write(b"bench", seed=2)
        sims[size] = (sim, definition)
    try:
        for rep in range(reps):
            order = [(s, i) for s in (_SMALL, _GIB) for i in (True, False)]
            for size, ignore in order if rep % 2 == 0 else order[::-1]:
                sim, definition = sims[size]
                ports = sim.ports()
                skip = _skip(ports) if ignore else frozenset()
                state = folder / f"b{size}.state"
                state.unlink(missing_ok=True)
                uri = f"file:{state}"
                times.setdefault(("save", size, ignore), []).append(_save(ports, uri, skip))
                restore = _restore(ports, definition, uri, skip)
                times.setdefault(("restore", size, ignore), []).append(restore)
    finally:
        for sim, _ in sims.values():
            sim.close()
    return {key: statistics.median(values) for key, values in times.items()}


def _digest_seconds(folder: Path, reps: int) -> float:
    """Information: the memory port's digest of 1 GiB of guest RAM."""
    sim = Simulator(folder / "d")
    sim.ports().host.start_qemu(VmDefinition(memory="ram", ram_size=_GIB))
    sim.guest_write(b"bench", seed=3)
    try:
        runs = []
        for _ in range(reps):
            started = time.perf_counter()
            sim.ram_digest()
            runs.append(time.perf_counter() - started)
    finally:
        sim.close()
    return statistics.median(runs)


def _peak_child(folder: Path) -> None:
    """In a child process: fill and save a 1 GiB guest, print VmHWM in bytes."""
    sim = Simulator(folder / "rss")
    ports = sim.ports()
    ports.host.start_qemu(VmDefinition(memory="ram", ram_size=_GIB))
    sim.guest_write(b"bench", seed=4)
    _save(ports, f"file:{folder / 'rss.state'}", frozenset())
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    peak = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    print(int(peak.split()[1]) * 1024)


def _peak_rss(folder: Path) -> int:
    """(d): the child's peak RSS in bytes."""
    try:
        child = subprocess.run(  # noqa: S603 - this interpreter running this file
            [sys.executable, __file__, "--peak-child", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        (folder / "rss.state").unlink(missing_ok=True)
    return int(child.stdout.split()[-1])


def _row(*cells: str, ok: bool | None = None) -> str:
    verdict = "" if ok is None else ("PASS" if ok else "MISS")
    return "| " + " | ".join((*cells, verdict)) + " |"


def main() -> int:
    """Run the four measurements and print the table; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))  # noqa: S108 - disk, not tmpfs
    parser.add_argument("--peak-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child is not None:
        _peak_child(args.peak_child)
        return 0
    base: Path = args.dir
    if on_volatile_filesystem(str(base)):
        print(f"{base} is on tmpfs: pick a disk-backed folder with --dir", file=sys.stderr)
        return 2
    free = shutil.disk_usage(base).free
    if free < _FREE_NEEDED:
        print(f"{base} has {free / _GIB:.1f} GiB free; the benchmark needs 3.5", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="cprfsm-bench-", dir=base))
    try:
        save, copy = _throughput(folder, args.reps)
        times = _scaling(folder, args.reps)
        digest = _digest_seconds(folder, args.reps)
        peak = _peak_rss(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows = [
        "| measure | simulator | anchor | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    ratio = copy / save
    rows.append(
        _row(
            "a. save 1 GiB (ram)",
            f"{save:.3f} s = {_GIB / save / 1e9:.2f} GB/s",
            f"copy + fsync {copy:.3f} s = {_GIB / copy / 1e9:.2f} GB/s",
            f"{ratio:.2f}x",
            ">= 0.6x",
            ok=ratio >= 0.6,
        )
    )
    for letter, kind in (("b", "save"), ("c", "restore")):
        for ignore in (True, False):
            big, small = times[kind, _GIB, ignore], times[kind, _SMALL, ignore]
            label = "x-ignore-shared" if ignore else "no x-ignore-shared"
            rows.append(
                _row(
                    f"{letter}. {kind} 1 GiB, file,share=on, {label}",
                    f"{big * 1e3:.1f} ms",
                    f"64 MiB: {small * 1e3:.1f} ms",
                    f"{big / small:.2f}x",
                    "<= 2x" if ignore else "(grows with RAM)",
                    ok=big / small <= 2 if ignore else None,
                )
            )
    limit = _GIB + _HEADROOM
    rows.append(
        _row(
            "d. peak RSS, fill + save 1 GiB",
            f"{peak / _MIB:.0f} MiB",
            f"RAM + 64 MiB = {limit / _MIB:.0f} MiB",
            f"{peak / limit:.2f}x",
            "<= 1x",
            ok=peak <= limit,
        )
    )
    rows.append(
        _row(
            "info: RAM digest of 1 GiB (machine, every save/restore)",
            f"{digest * 1e3:.0f} ms = {_GIB / digest / 1e9:.1f} GB/s",
            "",
            "",
            "",
        )
    )
    print("\n".join(rows))
    return 0 if all("MISS" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
