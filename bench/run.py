"""Benchmark cprfsm against the anchors of the performance notes, all in one run.

Every figure is the median of 5 repetitions interleaved with its anchor's (the two
alternate, and which goes first alternates too), reported as a ratio against the anchor:

1. transition: the live machine's cost per command (stop / cont on a running VM over an
   InMemoryStore and RecordingPorts, each recording one event) against a bare
   ``transitions`` trigger with one condition and one after-callback that records a
   frozen attrs record.  Target: at most 1.5x.
2. replay: SQLiteStore.read + lifecycle.fold of a long stop/cont log against raw sqlite3
   SELECT + json.loads + a dict fold of the same rows (same runstate-table check).
   Target: at least 0.5x the throughput.
3. append: durable transactions of 100 events (WAL, synchronous=FULL) through
   SQLiteStore.append against raw ``executemany`` of the same rows into the same table.
   Target: at least 0.5x the throughput.
4. import: ``import cprfsm`` in a fresh interpreter against importing its mandatory
   dependencies (attrs, yaml, structlog, transitions) alone.  Target: at most 1.2x.

The library never configures logging; like an application would, this script filters
structlog below INFO (the machine logs ``transition.applied`` at DEBUG).

Run: ``python bench/run.py [--events N] [--profile]``.
"""

# ruff: noqa: T201, INP001 - a script that prints, not a package module

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from transitions import Machine

from cprfsm import vm_events as ev
from cprfsm._store_sqlite import _SCHEMA
from cprfsm.lifecycle import VmState, replay
from cprfsm.machine import VirtualMachine
from cprfsm.model import load_model
from cprfsm.ports import RecordingPorts
from cprfsm.store import InMemoryStore, SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable

_REPETITIONS = 5
_QEMU = "10.0"
_VM = "bench-vm"
_BATCH = 100
_IMPORT_LAUNCHES = 4
_OURS_IMPORT = "import cprfsm"
_ANCHOR_IMPORT = "import attrs, yaml, structlog, transitions"
_HEADER = (
    f"{'benchmark':<34} {'cprfsm':>10} {'anchor':>10} {'unit':<9} {'ratio':>7}  "
    f"{'target':<8} result"
)


@attrs.frozen(kw_only=True)
class Result:
    """One benchmark: the medians of cprfsm and of its anchor, and the target ratio."""

    name: str
    unit: str
    ours: float
    anchor: float
    #: The ratio ours / anchor must stay at or below the target (costs), else at or above.
    lower_is_better: bool
    target: float

    @property
    def ratio(self) -> float:
        """cprfsm's figure divided by the anchor's."""
        return self.ours / self.anchor

    @property
    def passed(self) -> bool:
        """Whether the ratio meets the target."""
        if self.lower_is_better:
            return self.ratio <= self.target
        return self.ratio >= self.target

    def row(self) -> str:
        """The result as one line of the summary table."""
        target = f"{'<=' if self.lower_is_better else '>='} {self.target}x"
        return (
            f"{self.name:<34} {_number(self.ours):>10} {_number(self.anchor):>10} "
            f"{self.unit:<9} {self.ratio:>6.2f}x  {target:<8} {'PASS' if self.passed else 'MISS'}"
        )


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _interleaved(ours: Callable[[], float], anchor: Callable[[], float]) -> tuple[float, float]:
    """Medians of both measurements over repetitions that alternate them."""
    mine: list[float] = []
    theirs: list[float] = []
    for repetition in range(_REPETITIONS):
        if repetition % 2:
            theirs.append(anchor())
            mine.append(ours())
        else:
            mine.append(ours())
            theirs.append(anchor())
    return statistics.median(mine), statistics.median(theirs)


# --- 1. one transition ----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Record:
    """What the anchor's after-callback records."""

    state: str
    sequence: int


class _Bare:
    """The model object of the anchor machine."""

    state: str

    def __init__(self) -> None:
        self.records: list[_Record] = []

    def allowed(self) -> bool:
        """The one condition."""
        return True

    def record(self) -> None:
        """The one after-callback."""
        self.records.append(_Record(state=self.state, sequence=len(self.records)))


def _transition_anchor(pairs: int) -> float:
    """Microseconds per trigger of a bare two-state transitions Machine."""
    bare = _Bare()
    machine = Machine(
        model=bare,
        states=["running", "paused"],
        transitions=[
            {
                "trigger": "stop",
                "source": "running",
                "dest": "paused",
                "conditions": "allowed",
                "after": "record",
            },
            {
                "trigger": "cont",
                "source": "paused",
                "dest": "running",
                "conditions": "allowed",
                "after": "record",
            },
        ],
        initial="running",
        auto_transitions=False,
    )
    # How cprfsm's own engine fires a trigger; bare.stop() is the same call behind a partial.
    stop, cont = machine.events["stop"].trigger, machine.events["cont"].trigger
    start = time.perf_counter()
    for _ in range(pairs):
        stop(bare)
        cont(bare)
    elapsed = time.perf_counter() - start
    _check(len(bare.records) == 2 * pairs, "the anchor machine missed transitions")
    return elapsed / (2 * pairs) * 1e6


def _running_vm() -> VirtualMachine:
    vm = VirtualMachine(
        _VM, store=InMemoryStore(), executor=RecordingPorts().executor(), qemu=_QEMU
    )
    vm.start()
    return vm


def _stop_cont(vm: VirtualMachine, pairs: int) -> None:
    stop, cont = vm.stop, vm.cont
    for _ in range(pairs):
        stop()
        cont()


def _transition_ours(pairs: int) -> float:
    """Microseconds per stop or cont of the live machine, each recording one event."""
    vm = _running_vm()
    start = time.perf_counter()
    _stop_cont(vm, pairs)
    elapsed = time.perf_counter() - start
    _check(vm.state.version == 1 + 2 * pairs, "the live machine missed transitions")
    return elapsed / (2 * pairs) * 1e6


# --- 2. replay from SQLite --------------------------------------------------------------------


def _started() -> ev.QemuStarted:
    return ev.QemuStarted(
        incarnation=1,
        qemu_version=_QEMU,
        host_boot=1,
        paused=False,
        incoming=False,
        runstate="running",
        memory="ram",
        devices=(),
        aux_ram_share=False,
    )


_PAIR = (ev.VmStopped(runstate="paused", was_suspended=False), ev.VmResumed(runstate="running"))


def _fill_log(path: Path, count: int) -> None:
    """A started VM stopped and continued until its stream holds ``count`` events."""
    with SQLiteStore(path, synchronous="NORMAL") as store:
        version = store.append(_VM, [_started()], expected_version=0)
        while version < count:
            batch = list(_PAIR * 500)[: count - version]
            version = store.append(_VM, batch, expected_version=version)


def _fold_log(path: Path) -> VmState:
    with SQLiteStore(path, create=False) as store:
        return replay(_VM, (recorded.event for recorded in store.read(_VM)), qemu=_QEMU)


def _replay_ours(path: Path, count: int) -> float:
    """Events per second read and folded through SQLiteStore and lifecycle.fold."""
    start = time.perf_counter()
    state = _fold_log(path)
    elapsed = time.perf_counter() - start
    _check(state.version == count and state.runstate is not None, "cprfsm replayed wrongly")
    return count / elapsed


def _to(state: dict[str, Any], runstate: str, table: frozenset[tuple[str, str]]) -> None:
    old = state["runstate"]
    if old != runstate and (old, runstate) not in table:
        message = f"{old} -> {runstate} is not in the runstate table"
        raise ValueError(message)
    state["runstate"] = runstate


def _raw_started(state: dict[str, Any], data: dict[str, Any], _: frozenset[Any]) -> None:
    state.update(runstate=data["runstate"], qemu=data["qemu_version"], was_suspended=False)


def _raw_stopped(state: dict[str, Any], data: dict[str, Any], table: frozenset[Any]) -> None:
    _to(state, data["runstate"], table)
    state["was_suspended"] = data["was_suspended"]


def _raw_resumed(state: dict[str, Any], data: dict[str, Any], table: frozenset[Any]) -> None:
    _to(state, data["runstate"], table)
    state["was_suspended"] = False


_RAW_FOLD = {
    ev.QemuStarted.type_tag: _raw_started,
    ev.VmStopped.type_tag: _raw_stopped,
    ev.VmResumed.type_tag: _raw_resumed,
}


def _replay_raw(path: Path, count: int) -> float:
    """Events per second read with sqlite3 and json.loads, folded into a dict."""
    table = load_model(_QEMU).runstate_transitions
    connection = sqlite3.connect(path)
    query = "SELECT version, type, data FROM events WHERE stream_id = ? ORDER BY version"
    start = time.perf_counter()
    state: dict[str, Any] = {"version": 0, "runstate": None}
    for version, type_tag, data in connection.execute(query, (_VM,)):
        if version != state["version"] + 1:
            message = f"version {version} follows {state['version']}"
            raise ValueError(message)
        _RAW_FOLD[type_tag](state, json.loads(data), table)
        state["version"] = version
    elapsed = time.perf_counter() - start
    connection.close()
    _check(state["version"] == count, "the raw fold replayed wrongly")
    return count / elapsed


# --- 3. durable appends ----------------------------------------------------------------------

# The store's own table, so that both sides keep the same rows in the same b-trees.
_TABLE = _SCHEMA[0]
_INSERT = (
    "INSERT INTO events (stream_id, version, event_id, type, schema_version, data, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _append_ours(path: Path, batches: int) -> float:
    """Events per second appended by SQLiteStore, 100 per durable transaction."""
    events = list(_PAIR * (_BATCH // 2))
    with SQLiteStore(path, synchronous="FULL") as store:
        version = 0
        start = time.perf_counter()
        for _ in range(batches):
            version = store.append(_VM, events, expected_version=version)
        elapsed = time.perf_counter() - start
    return version / elapsed


def _append_raw(path: Path, batches: int) -> float:
    """Events per second appended with raw executemany, 100 per durable transaction."""
    payloads = [(type(event).type_tag, attrs.asdict(event)) for event in _PAIR * (_BATCH // 2)]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(_TABLE)
    version = 0
    start = time.perf_counter()
    for _ in range(batches):
        recorded_at = datetime.now(UTC).isoformat()
        rows = [
            (
                _VM,
                version + offset,
                f"{version + offset:032x}",  # ordered ids, as the store's UUIDv7 are
                type_tag,
                1,
                json.dumps(data, separators=(",", ":")),
                recorded_at,
            )
            for offset, (type_tag, data) in enumerate(payloads, 1)
        ]
        connection.execute("BEGIN")
        connection.executemany(_INSERT, rows)
        connection.execute("COMMIT")
        version += len(rows)
    elapsed = time.perf_counter() - start
    connection.close()
    return version / elapsed


# --- 4. import ----------------------------------------------------------------------------------


def _launch(code: str) -> float:
    """Milliseconds for a fresh interpreter to run ``code`` and exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)  # noqa: S603 - our own interpreter
    return (time.perf_counter() - start) * 1e3


def _imports(code: str) -> float:
    return statistics.fmean(_launch(code) for _ in range(_IMPORT_LAUNCHES))


def _import_breakdown() -> str:
    """cprfsm's modules by cumulative import time (``-X importtime``), slowest first."""
    proc = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-X", "importtime", "-c", _OURS_IMPORT],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        _, own, cumulative, name = (part.strip() for part in line.replace(":", "|", 1).split("|"))
        if name.startswith("cprfsm") and own.isdigit():
            rows.append((int(cumulative), int(own), name))
    return "\n".join(
        f"  {name:<24} {cumulative / 1e3:>6.1f} ms cumulative, {own / 1e3:>5.1f} ms own"
        for cumulative, own, name in sorted(rows, reverse=True)
    )


# --- running -------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:  # noqa: FBT001 - a sanity check
    if not condition:
        raise SystemExit(f"bench/run.py: {message}")


def _profile(title: str, action: Callable[[], object]) -> None:
    print(f"\n--- profile: {title} (top 15 by own time) ---")
    profiler = cProfile.Profile()
    profiler.runcall(action)
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def _measure(root: Path, options: argparse.Namespace) -> list[Result]:
    pairs, events, batches = options.pairs, options.events, options.batches
    _transition_ours(100)  # load the model and build the shared Machine before timing
    log = root / "replay.sqlite"
    _fill_log(log, events)
    files = itertools.count()
    plan: list[tuple[str, str, bool, float, Callable[[], float], Callable[[], float]]] = [
        (
            "transition (stop/cont)",
            "us/trans",
            True,
            1.5,
            lambda: _transition_ours(pairs),
            lambda: _transition_anchor(pairs),
        ),
        (
            f"replay {events:,} events (SQLite)",
            "events/s",
            False,
            0.5,
            lambda: _replay_ours(log, events),
            lambda: _replay_raw(log, events),
        ),
        (
            f"append {_BATCH}/transaction, FULL",
            "events/s",
            False,
            0.5,
            lambda: _append_ours(root / f"ours-{next(files)}.sqlite", batches),
            lambda: _append_raw(root / f"raw-{next(files)}.sqlite", batches),
        ),
        (
            "import cprfsm (fresh process)",
            "ms",
            True,
            1.2,
            lambda: _imports(_OURS_IMPORT),
            lambda: _imports(_ANCHOR_IMPORT),
        ),
    ]
    results = []
    for name, unit, lower_is_better, target, ours, anchor in plan:
        mine, theirs = _interleaved(ours, anchor)
        results.append(
            Result(
                name=name,
                unit=unit,
                ours=mine,
                anchor=theirs,
                lower_is_better=lower_is_better,
                target=target,
            )
        )
        print(results[-1].row(), flush=True)
    if options.profile:
        _profile("live machine, 2,000 x stop/cont", lambda: _stop_cont(_running_vm(), 1000))
        _profile(f"cprfsm replay of {events:,} events", lambda: _fold_log(log))
        print("\n--- import cprfsm, by module (-X importtime) ---")
        print(_import_breakdown())
    return results


def main() -> None:
    """Run the four benchmarks and print the summary table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5_000, help="stop/cont pairs per run")
    parser.add_argument("--events", type=int, default=200_000, help="events replayed")
    parser.add_argument("--batches", type=int, default=100, help="100-event appends per run")
    parser.add_argument(
        "--profile", action="store_true", help="also profile cprfsm's side of 1, 2 and 4"
    )
    options = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    started = time.perf_counter()
    print(_HEADER)
    with tempfile.TemporaryDirectory() as directory:
        results = _measure(Path(directory), options)
    print(
        f"\ncprfsm benchmarks: medians of {_REPETITIONS} interleaved repetitions, "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    print(_HEADER)
    for result in results:
        print(result.row())


if __name__ == "__main__":
    main()
