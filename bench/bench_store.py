"""Benchmark SQLiteStore against raw sqlite3 + json on the same rows, in the same run.

Replay: read and decode a 200k-event stream, against SELECT + json.loads + one dict per
row.  Append: durable transactions of 100 events (WAL, synchronous=FULL), against raw
``executemany`` of ``json.dumps`` payloads into the anchor table
``events(stream_id, version, type, data, PRIMARY KEY (stream_id, version))``.  Each figure
is the median of 5 interleaved repetitions; ratios are ours / raw throughput.

Run: ``python bench/bench_store.py [--events N] [--batches N]``.
"""

# ruff: noqa: T201, INP001 - a script that prints, not a package module

from __future__ import annotations

import argparse
import enum
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import attrs

from cprfsm.events import Event, EventRegistry
from cprfsm.store import SQLiteStore

_REPETITIONS = 5
_BATCH = 100
_STREAM = "vm-0001"
_registry = EventRegistry()


class _RunState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"


@_registry.event("bench.runstate-changed", version=1)
@attrs.frozen(kw_only=True)
class _RunStateChanged(Event):
    vm: str
    incarnation: int
    previous: _RunState
    current: _RunState
    reason: str | None
    capabilities: frozenset[str]


def _event(n: int) -> _RunStateChanged:
    states = list(_RunState)
    return _RunStateChanged(
        vm=_STREAM,
        incarnation=n,
        previous=states[n % 3],
        current=states[(n + 1) % 3],
        reason=None if n % 2 else "migration",
        capabilities=frozenset({"x-ignore-shared", "events"}),
    )


def _fill(path: Path, count: int) -> None:
    with SQLiteStore(path, synchronous="NORMAL", registry=_registry) as store:
        for start in range(0, count, 1000):
            events = [_event(n) for n in range(start, start + 1000)]
            store.append(_STREAM, events, expected_version=start)


def _replay_ours(path: Path) -> float:
    with SQLiteStore(path, create=False, registry=_registry) as store:
        start = time.perf_counter()
        count = sum(1 for _ in store.read(_STREAM))
        return count / (time.perf_counter() - start)


def _replay_raw(path: Path) -> float:
    connection = sqlite3.connect(path)
    query = (
        "SELECT version, event_id, type, schema_version, data, recorded_at FROM events"
        " WHERE stream_id = ? ORDER BY version"
    )
    start = time.perf_counter()
    count = 0
    for version, event_id, type_tag, schema_version, data, recorded_at in connection.execute(
        query, (_STREAM,)
    ):
        row = {
            "stream_id": _STREAM,
            "version": version,
            "event_id": event_id,
            "type": type_tag,
            "schema_version": schema_version,
            "data": json.loads(data),
            "recorded_at": recorded_at,
        }
        count += bool(row)
    elapsed = time.perf_counter() - start
    connection.close()
    return count / elapsed


def _append_ours(path: Path, batches: int) -> float:
    events = [_event(n) for n in range(_BATCH)]
    with SQLiteStore(path, registry=_registry) as store:
        start = time.perf_counter()
        version = 0
        for _ in range(batches):
            version = store.append(_STREAM, events, expected_version=version)
        return version / (time.perf_counter() - start)


def _append_raw(path: Path, batches: int) -> float:
    payloads = [
        {
            "vm": e.vm,
            "incarnation": e.incarnation,
            "previous": e.previous.value,
            "current": e.current.value,
            "reason": e.reason,
            "capabilities": sorted(e.capabilities),
        }
        for e in (_event(n) for n in range(_BATCH))
    ]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(
        "CREATE TABLE events (stream_id TEXT, version INTEGER, type TEXT, data TEXT,"
        " PRIMARY KEY (stream_id, version))"
    )
    insert = "INSERT INTO events VALUES (?, ?, ?, ?)"
    start = time.perf_counter()
    version = 0
    for _ in range(batches):
        rows = [
            (_STREAM, version + i, "bench.runstate-changed", json.dumps(p))
            for i, p in enumerate(payloads, 1)
        ]
        connection.execute("BEGIN")
        connection.executemany(insert, rows)
        connection.execute("COMMIT")
        version += _BATCH
    elapsed = time.perf_counter() - start
    connection.close()
    return version / elapsed


def _report(name: str, ours: list[float], raw: list[float]) -> None:
    mine, theirs = statistics.median(ours), statistics.median(raw)
    print(f"{name}:")
    print(f"  cprfsm {mine:>12,.0f} events/s")
    print(f"  raw    {theirs:>12,.0f} events/s")
    print(f"  ratio  {mine / theirs:>12.2f}x")


def main() -> None:
    """Run both benchmarks and print events/s and ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events replayed")
    parser.add_argument("--batches", type=int, default=100, help="100-event appends per run")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        log = root / "replay.sqlite"
        _fill(log, options.events)
        replay_ours: list[float] = []
        replay_raw: list[float] = []
        append_ours: list[float] = []
        append_raw: list[float] = []
        for repetition in range(_REPETITIONS):
            replay_ours.append(_replay_ours(log))
            replay_raw.append(_replay_raw(log))
            append_ours.append(_append_ours(root / f"ours-{repetition}.sqlite", options.batches))
            append_raw.append(_append_raw(root / f"raw-{repetition}.sqlite", options.batches))
    _report(f"replay of {options.events:,} events (read + decode)", replay_ours, replay_raw)
    _report(f"append, {_BATCH} events per transaction, synchronous=FULL", append_ours, append_raw)


if __name__ == "__main__":
    main()
