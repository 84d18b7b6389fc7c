"""The contract every :class:`~cprfsm.store.EventStore` passes, as pytest tests.

Subclass :class:`EventStoreContract` in a test module, name the subclass ``Test...`` and
say how to make the store; pytest then runs the whole contract against it::

    from cprfsm.testing.contract import EventStoreContract

    class TestMyStore(EventStoreContract):
        persistent = True

        def make_store(self, path, registry):
            return MyStore(path, registry=registry)

This module runs under pytest, which the ``testing`` extra does not install (the
kit in :mod:`cprfsm.testing` needs no pytest): ``pip install pytest`` next to
``cprfsm[testing]``.
"""

from __future__ import annotations

import abc
import itertools
import math
import multiprocessing
import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

try:
    import pytest
except ModuleNotFoundError as missing:  # pragma: no cover - exercised in a clean venv
    raise ModuleNotFoundError(
        "cprfsm.testing.contract runs under pytest, which is not installed: "
        "pip install pytest (the kit in cprfsm.testing works without it)",
        name=missing.name,
    ) from missing

from cprfsm.events import MAX_JSON_BYTES, MAX_JSON_DEPTH, Event, EventRegistry
from cprfsm.exceptions import (
    DamagedStreamError,
    DuplicateEventIdError,
    StoreError,
    UsageError,
    VersionConflict,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cprfsm.store import EventStore

__all__ = ["EventStoreContract"]

_registry = EventRegistry()
_STREAM = "vm-1"
_PROCESS_TIMEOUT = 120.0
_KILL_BATCH = 10


@_registry.event("cprfsm.testing.counted")
@attrs.frozen(kw_only=True)
class _Counted(Event):
    """Writer ``writer`` appended its ``n``-th event."""

    writer: str
    n: int


@_registry.event("cprfsm.testing.measured")
@attrs.frozen(kw_only=True)
class _Measured(Event):
    """A measurement, to check floats and refusals of NaN."""

    value: float


@attrs.frozen(kw_only=True)
class _Unregistered(Event):
    """An event no registry knows."""


def _counted(count: int, writer: str = "w", start: int = 0) -> list[Event]:
    return [_Counted(writer=writer, n=n) for n in range(start, start + count)]


class EventStoreContract(abc.ABC):
    """The behaviour every event store shares; subclass it once per store implementation.

    ``persistent`` says the store keeps its events in ``path``: the tests that reopen the
    store, append from two processes at once and kill a writer then run too.  Subclasses
    must be importable by name (defined at module level): those processes rebuild the
    store with ``make_store``.
    """

    persistent: ClassVar[bool] = False

    @abc.abstractmethod
    def make_store(self, path: Path, registry: EventRegistry) -> EventStore:
        """A store at ``path`` (in a fresh temporary directory), decoding with ``registry``.

        Called again with the same path, a persistent store must reopen what is there.
        """

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        """Where the store under test lives."""
        return tmp_path / "events.sqlite"

    @pytest.fixture
    def store(self, path: Path) -> Iterator[EventStore]:
        """A new, empty store, closed after the test."""
        store = self.make_store(path, _registry)
        yield store
        store.close()

    def damage_event(self, store: EventStore, path: Path, stream_id: str, version: int) -> None:
        """Change the stored payload of one event behind the store's back, if that can be done.

        Override it to run the damage tests; left as it is, they are skipped.
        """
        del store, path, stream_id, version
        pytest.skip("the store under test cannot be damaged from outside")

    def _require_persistence(self) -> None:
        if not self.persistent:
            pytest.skip("the store does not persist its events")

    def test_append_then_read_round_trip(self, store: EventStore) -> None:
        """Appended events read back in order, as equal events with their positions."""
        events = [*_counted(2), _Measured(value=0.5)]
        assert store.append(_STREAM, events, expected_version=0) == 3
        recorded = list(store.read(_STREAM))
        assert [r.event for r in recorded] == events
        assert [r.version for r in recorded] == [1, 2, 3]
        assert {r.stream_id for r in recorded} == {_STREAM}
        assert len({r.event_id for r in recorded}) == 3
        assert all(r.recorded_at.utcoffset() == timedelta(0) for r in recorded)
        assert store.version(_STREAM) == 3

    def test_new_stream_is_empty(self, store: EventStore) -> None:
        """A stream nothing was appended to is at version 0 and reads as empty."""
        assert store.version(_STREAM) == 0
        assert list(store.read(_STREAM)) == []
        assert store.streams() == []

    def test_stale_expected_version_conflicts_and_writes_nothing(self, store: EventStore) -> None:
        """An append expecting another version raises VersionConflict and changes nothing."""
        store.append(_STREAM, _counted(2), expected_version=0)
        before = list(store.read(_STREAM))
        for expected in (0, 1, 3):
            with pytest.raises(VersionConflict) as caught:
                store.append(_STREAM, _counted(1, writer="late"), expected_version=expected)
            assert (caught.value.stream, caught.value.expected) == (_STREAM, expected)
            assert caught.value.actual == 2
        assert list(store.read(_STREAM)) == before

    def test_batch_with_an_unencodable_event_writes_nothing(self, store: EventStore) -> None:
        """A batch whose middle event cannot be encoded is refused whole."""
        for bad in (_Measured(value=math.nan), _Unregistered()):
            with pytest.raises(UsageError):
                store.append(_STREAM, [*_counted(1), bad, *_counted(1)], expected_version=0)
        assert store.version(_STREAM) == 0
        assert store.streams() == []

    def test_batch_with_a_clashing_id_writes_nothing(self, store: EventStore) -> None:
        """A batch whose last event reuses a stored id is refused whole."""
        store.append("other", _counted(1), expected_version=0, event_ids=["taken"])
        with pytest.raises(DuplicateEventIdError):
            store.append(_STREAM, _counted(3), expected_version=0, event_ids=["a", "b", "taken"])
        assert store.version(_STREAM) == 0
        store.append(_STREAM, _counted(2), expected_version=0, event_ids=["a", "b"])
        assert [r.event_id for r in store.read(_STREAM)] == ["a", "b"]

    def test_retried_batch_is_a_no_op(self, store: EventStore) -> None:
        """Appending the same batch with the same ids again writes nothing and says where it is."""
        batch, ids = _counted(2), ["first", "second"]
        assert store.append(_STREAM, batch, expected_version=0, event_ids=ids) == 2
        before = list(store.read(_STREAM))
        assert store.append(_STREAM, batch, expected_version=0, event_ids=ids) == 2
        store.append(_STREAM, _counted(1, writer="next"), expected_version=2)
        assert store.append(_STREAM, batch, expected_version=0, event_ids=ids) == 2
        assert list(store.read(_STREAM, last=2)) == before
        assert store.version(_STREAM) == 3

    def test_reused_id_with_other_content_or_place_is_refused(self, store: EventStore) -> None:
        """An event id stored once is refused with other content, at another place or stream."""
        store.append(_STREAM, _counted(1), expected_version=0, event_ids=["once"])
        attempts: list[tuple[str, list[Event], int]] = [
            (_STREAM, _counted(1, writer="changed"), 0),
            (_STREAM, _counted(1), 1),
            ("elsewhere", _counted(1), 0),
        ]
        for stream, events, expected in attempts:
            with pytest.raises(DuplicateEventIdError) as caught:
                store.append(stream, events, expected_version=expected, event_ids=["once"])
            assert caught.value.event_id == "once"
        assert store.version(_STREAM) == 1
        assert store.streams() == [_STREAM]

    def test_partly_stored_batch_is_refused(self, store: EventStore) -> None:
        """A batch sharing only some ids with a stored one is not a retry and is refused."""
        store.append(_STREAM, _counted(1), expected_version=0, event_ids=["a"])
        with pytest.raises(DuplicateEventIdError):
            store.append(_STREAM, _counted(2), expected_version=0, event_ids=["a", "b"])
        assert store.version(_STREAM) == 1

    def test_malformed_event_ids_are_refused(self, store: EventStore) -> None:
        """Event ids must be one distinct non-empty string per event."""
        for ids in (["a"], ["a", "a"], ["a", ""]):
            with pytest.raises(UsageError):
                store.append(_STREAM, _counted(2), expected_version=0, event_ids=ids)
        assert store.version(_STREAM) == 0

    def test_malformed_arguments_are_refused(self, store: EventStore) -> None:
        """Empty stream ids and negative versions are usage errors, not conflicts."""
        with pytest.raises(UsageError):
            store.append("", _counted(1), expected_version=0)
        with pytest.raises(UsageError):
            store.append(_STREAM, _counted(1), expected_version=-1)
        with pytest.raises(UsageError):
            store.read(_STREAM, first=0)
        with pytest.raises(UsageError):
            store.load_snapshot(_STREAM, at_most=-1)

    def test_empty_batch_writes_nothing(self, store: EventStore) -> None:
        """An empty batch creates no stream but still checks the expected version."""
        assert store.append(_STREAM, [], expected_version=0) == 0
        assert store.streams() == []
        with pytest.raises(VersionConflict):
            store.append(_STREAM, [], expected_version=1)

    def test_read_ranges(self, store: EventStore) -> None:
        """Reads return the inclusive range from first to last, clipped to the stream."""
        store.append(_STREAM, _counted(5), expected_version=0)

        def versions(first: int = 1, last: int | None = None) -> list[int]:
            return [r.version for r in store.read(_STREAM, first=first, last=last)]

        assert versions(2, 4) == [2, 3, 4]
        assert versions(4) == [4, 5]
        assert versions(last=2) == [1, 2]
        assert versions(3, 3) == [3]
        assert versions(4, 3) == []
        assert versions(6) == []
        assert versions(2, 99) == [2, 3, 4, 5]
        assert versions(last=0) == []

    def test_read_is_lazy_and_survives_an_append(self, store: EventStore) -> None:
        """A read is an iterator; appending while it is half consumed does not break it."""
        store.append(_STREAM, _counted(3), expected_version=0)
        reading = store.read(_STREAM)
        assert iter(reading) is reading
        first = next(reading)
        store.append(_STREAM, _counted(2, start=3), expected_version=3)
        rest = list(reading)
        assert [r.version for r in [first, *rest]][:3] == [1, 2, 3]
        assert store.version(_STREAM) == 5

    def test_streams_lists_every_stream_sorted(self, store: EventStore) -> None:
        """Every stream holding events is listed once, in sorted order."""
        for stream in ("vm-b", "vm-a", "vm-c"):
            store.append(stream, _counted(2), expected_version=0)
        store.append("vm-a", _counted(1), expected_version=2)
        assert store.streams() == ["vm-a", "vm-b", "vm-c"]

    def test_snapshot_loads_the_latest_at_or_below_a_version(self, store: EventStore) -> None:
        """The snapshot loaded is the newest whose version is at most the one asked for."""
        store.append(_STREAM, _counted(5), expected_version=0)
        store.save_snapshot(_STREAM, 2, {"runstate": "paused", "count": 2})
        store.save_snapshot(_STREAM, 4, {"runstate": "running", "count": 4, "caps": ["a"]})
        latest = store.load_snapshot(_STREAM)
        assert latest is not None
        assert (latest.stream_id, latest.version) == (_STREAM, 4)
        assert latest.state == {"runstate": "running", "count": 4, "caps": ["a"]}
        older = store.load_snapshot(_STREAM, at_most=3)
        assert older is not None
        assert older.version == 2
        assert store.load_snapshot(_STREAM, at_most=1) is None
        assert store.load_snapshot("no-such-stream") is None

    def test_snapshot_at_a_saved_version_replaces_it(self, store: EventStore) -> None:
        """Saving a snapshot again at the same version keeps only the newer state."""
        store.append(_STREAM, _counted(1), expected_version=0)
        store.save_snapshot(_STREAM, 1, {"n": 1})
        store.save_snapshot(_STREAM, 1, {"n": 2})
        snapshot = store.load_snapshot(_STREAM)
        assert snapshot is not None
        assert snapshot.state == {"n": 2}

    def test_snapshot_must_be_json_and_not_ahead(self, store: EventStore) -> None:
        """A snapshot must be a JSON object at a version the stream has reached."""
        store.append(_STREAM, _counted(1), expected_version=0)
        with pytest.raises(UsageError):
            store.save_snapshot(_STREAM, 2, {"n": 2})
        with pytest.raises(UsageError):
            store.save_snapshot(_STREAM, 1, {"caps": {"a", "b"}})
        with pytest.raises(UsageError):
            store.save_snapshot(_STREAM, 1, {"ratio": math.inf})
        assert store.load_snapshot(_STREAM) is None

    def test_recorded_times_never_go_back(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When the clock steps back, appends keep the stream's last time instead."""
        times = iter([datetime(2030, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC)])
        # The store's clock is private to the codec; patching it by name keeps it so.
        monkeypatch.setattr("cprfsm.events._now", lambda: next(times))
        store.append(_STREAM, _counted(2), expected_version=0)
        store.append(_STREAM, _counted(2, start=2), expected_version=2)
        stamps = [r.recorded_at for r in store.read(_STREAM)]
        assert stamps == [datetime(2030, 1, 1, tzinfo=UTC)] * 4

    def test_oversized_event_is_refused(self, store: EventStore) -> None:
        """An event whose JSON exceeds MAX_JSON_BYTES is refused before anything is written."""
        with pytest.raises(UsageError, match="more than"):
            store.append(_STREAM, [_Counted(writer="x" * MAX_JSON_BYTES, n=0)], expected_version=0)
        assert store.version(_STREAM) == 0

    def test_too_deep_snapshot_is_refused(self, store: EventStore) -> None:
        """A snapshot nested deeper than MAX_JSON_DEPTH (or than Python can encode) is refused."""
        store.append(_STREAM, _counted(1), expected_version=0)
        for depth in (MAX_JSON_DEPTH + 1, 100_000):
            state: dict[str, Any] = {}
            for _ in range(depth):
                state = {"a": state}
            with pytest.raises(UsageError):
                store.save_snapshot(_STREAM, 1, state)
        assert store.load_snapshot(_STREAM) is None

    def test_damaged_event_is_reported_at_its_version(self, store: EventStore, path: Path) -> None:
        """An event changed behind the store's back raises DamagedStreamError at its version."""
        store.append(_STREAM, _counted(5), expected_version=0)
        self.damage_event(store, path, _STREAM, 3)
        reading = store.read(_STREAM)
        assert [next(reading).version for _ in range(2)] == [1, 2]
        with pytest.raises(DamagedStreamError) as caught:
            next(reading)
        assert (caught.value.stream, caught.value.version) == (_STREAM, 3)
        assert [r.version for r in store.read(_STREAM, last=2)] == [1, 2]
        with pytest.raises(DamagedStreamError):
            list(store.read(_STREAM, first=3))

    def test_closed_store_refuses_use(self, store: EventStore) -> None:
        """After close every operation raises StoreError; closing again is harmless."""
        store.append(_STREAM, _counted(1), expected_version=0)
        store.close()
        store.close()
        with pytest.raises(StoreError):
            store.append(_STREAM, _counted(1), expected_version=1)
        with pytest.raises(StoreError):
            store.read(_STREAM)
        with pytest.raises(StoreError):
            store.version(_STREAM)

    def test_closing_during_a_read_stops_it_with_store_error(self, path: Path) -> None:
        """A read still being consumed when the store closes ends with StoreError."""
        store = self.make_store(path, _registry)
        store.append(_STREAM, _counted(3), expected_version=0)
        reading = store.read(_STREAM)
        next(reading)
        store.close()
        with pytest.raises(StoreError):
            list(reading)

    def test_context_manager_closes(self, path: Path) -> None:
        """Leaving a ``with`` block closes the store."""
        with self.make_store(path, _registry) as store:
            store.append(_STREAM, _counted(1), expected_version=0)
        with pytest.raises(StoreError):
            store.version(_STREAM)

    def test_reopened_store_sees_everything(self, path: Path) -> None:
        """A persistent store reopened holds the same events, ids, times and snapshots."""
        self._require_persistence()
        with self.make_store(path, _registry) as store:
            store.append(_STREAM, _counted(3), expected_version=0)
            store.append("vm-2", _counted(1), expected_version=0, event_ids=["given"])
            store.save_snapshot(_STREAM, 2, {"n": 2})
            before = list(store.read(_STREAM))
        with self.make_store(path, _registry) as store:
            assert list(store.read(_STREAM)) == before
            assert store.streams() == [_STREAM, "vm-2"]
            assert [r.event_id for r in store.read("vm-2")] == ["given"]
            assert store.load_snapshot(_STREAM) == store.load_snapshot(_STREAM, at_most=2)
            assert store.append(_STREAM, _counted(1), expected_version=3) == 4

    def test_two_processes_appending_lose_nothing(self, path: Path) -> None:
        """Two processes appending to one stream, retrying on conflict, keep every event once."""
        self._require_persistence()
        count = 200
        self.make_store(path, _registry).close()
        context = multiprocessing.get_context("spawn")
        start = context.Event()
        writers = [
            context.Process(
                target=_append_with_retries, args=(type(self), str(path), name, count, start)
            )
            for name in ("a", "b")
        ]
        for writer in writers:
            writer.start()
        start.set()
        for writer in writers:
            writer.join(_PROCESS_TIMEOUT)
            assert writer.exitcode == 0, f"writer process failed with exit code {writer.exitcode}"
        with self.make_store(path, _registry) as store:
            recorded = list(store.read(_STREAM))
        assert [r.version for r in recorded] == list(range(1, 2 * count + 1))
        for name in ("a", "b"):
            mine = [
                r.event
                for r in recorded
                if isinstance(r.event, _Counted) and r.event.writer == name
            ]
            assert mine == _counted(count, writer=name)

    def test_killed_writer_leaves_whole_batches(self, path: Path) -> None:
        """A writer killed mid-append leaves a readable, contiguous prefix of whole batches."""
        self._require_persistence()
        if not hasattr(signal, "SIGKILL"):
            pytest.skip("this platform cannot kill a process with SIGKILL")
        context = multiprocessing.get_context("spawn")
        for attempt in range(3):
            attempt_path = path.with_name(f"killed-{attempt}.sqlite")
            started = context.Event()
            writer = context.Process(
                target=_append_batches_forever, args=(type(self), str(attempt_path), started)
            )
            writer.start()
            try:
                assert started.wait(_PROCESS_TIMEOUT), "the writer never appended"
                time.sleep(random.uniform(0.0, 0.2))  # noqa: S311 - a moment, not a secret
            finally:
                os.kill(writer.pid or 0, signal.SIGKILL)
                writer.join(_PROCESS_TIMEOUT)
            with self.make_store(attempt_path, _registry) as store:
                recorded = list(store.read(_STREAM))
                assert recorded
                assert len(recorded) % _KILL_BATCH == 0
                assert [r.version for r in recorded] == list(range(1, len(recorded) + 1))
                expected = [
                    _Counted(writer=str(batch), n=n)
                    for batch in range(len(recorded) // _KILL_BATCH)
                    for n in range(_KILL_BATCH)
                ]
                assert [r.event for r in recorded] == expected
                store.append(_STREAM, _counted(1), expected_version=len(recorded))


def _append_with_retries(
    contract: type[EventStoreContract], path: str, writer: str, count: int, start: Any
) -> None:
    """Child process: append ``count`` single events, retrying each on VersionConflict."""
    store = contract().make_store(Path(path), _registry)
    start.wait(_PROCESS_TIMEOUT)
    try:
        for n in range(count):
            while True:
                version = store.version(_STREAM)
                try:
                    store.append(_STREAM, [_Counted(writer=writer, n=n)], expected_version=version)
                    break
                except VersionConflict:
                    continue
    finally:
        store.close()


def _append_batches_forever(contract: type[EventStoreContract], path: str, started: Any) -> None:
    """Child process: append numbered batches until killed."""
    store = contract().make_store(Path(path), _registry)
    version = 0
    for batch in itertools.count():
        events = [_Counted(writer=str(batch), n=n) for n in range(_KILL_BATCH)]
        version = store.append(_STREAM, events, expected_version=version)
        started.set()
