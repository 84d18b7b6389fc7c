"""Event stores: one contract, kept in memory or in an SQLite file.

Every store appends batches of events to a stream atomically, after checking the version
the writer expects (optimistic concurrency: a stale writer gets :class:`VersionConflict`
and nothing is written).  Event ids make retries safe: appending a batch again whose ids
are already stored, at the same place with the same content, writes nothing and returns
the version the batch ended at.  Reads stream events in version order; snapshots keep a
folded state next to the version it reflects.

:class:`InMemoryStore` lives and dies with the process; :class:`SQLiteStore` survives it,
and several processes may append to one file.  ``cprfsm.testing.EventStoreContract`` is
the test suite both pass, and that any other implementation should pass too.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self

from cprfsm._store_sqlite import SQLiteStore
from cprfsm.events import (
    RecordedEvent,
    Snapshot,
    _check_range,
    _check_stream_id,
    _check_version,
    _decode_state,
    _encode_batch,
    _encode_state,
    _genesis,
    _Head,
    _link,
    _replayed_version,
    _stamp,
    _store_closed,
    _Stored,
    _StreamCheck,
    default_registry,
)
from cprfsm.exceptions import CorruptStoreError, EventDecodeError, UsageError, VersionConflict

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from datetime import datetime

    from cprfsm.events import Event, EventRegistry

#: What in-memory stores name as their file in errors.
_IN_MEMORY = "<in-memory store>"
_NO_LAST = 2**63 - 1

__all__ = ["EventStore", "InMemoryStore", "RecordedEvent", "SQLiteStore", "Snapshot"]


class EventStore(Protocol):
    """What every event store offers; ``cprfsm.testing.EventStoreContract`` checks it."""

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Append ``events`` after ``expected_version`` atomically; the version the last holds.

        ``expected_version`` is 0 for a new stream.  Raises :class:`VersionConflict` when
        the stream is elsewhere, and :class:`DuplicateEventIdError` when a given event id is
        stored elsewhere or with other content.  Without ``event_ids`` fresh ones are made.
        """

    def read(
        self, stream_id: str, *, first: int = 1, last: int | None = None
    ) -> Iterator[RecordedEvent]:
        """The stream's events from version ``first`` to ``last`` (inclusive), in order."""

    def version(self, stream_id: str) -> int:
        """The stream's current version: how many events it holds (0 if none)."""

    def streams(self) -> list[str]:
        """The ids of the streams holding at least one event, sorted."""

    def save_snapshot(self, stream_id: str, version: int, state: dict[str, Any]) -> None:
        """Keep a JSON-encodable ``state`` folded from the stream up to ``version``."""

    def load_snapshot(self, stream_id: str, *, at_most: int | None = None) -> Snapshot | None:
        """The latest snapshot of the stream at or below version ``at_most``, if any."""

    def close(self) -> None:
        """Release the store; using it afterwards raises :class:`StoreError`."""

    def __enter__(self) -> Self:
        """The store itself, closed when the ``with`` block ends."""

    def __exit__(self, *exc_info: object) -> None:
        """Close the store."""


class _Row(NamedTuple):
    version: int
    event_id: str
    type_tag: str
    schema_version: int
    data: str
    recorded_at: str
    chain: bytes


class InMemoryStore:
    """An event store in this process's memory, with the same semantics as :class:`SQLiteStore`.

    Events are kept encoded, exactly as a file would hold them, chain values and stream
    heads included, so what reads hand back is decoded afresh and never shares state with
    what was appended, and reads check each stream as :class:`SQLiteStore` does.  Safe to
    share between threads.
    """

    def __init__(self, *, registry: EventRegistry | None = None) -> None:
        """Start an empty store encoding events with ``registry`` (the default one if None)."""
        self._registry = default_registry if registry is None else registry
        self._lock = threading.Lock()
        self._streams: dict[str, list[_Row]] = {}
        self._heads: dict[str, _Head] = {}
        self._times: dict[str, datetime] = {}
        self._positions: dict[str, tuple[str, int]] = {}
        self._snapshots: dict[str, dict[int, str]] = {}
        self._closed = False

    def __repr__(self) -> str:
        """Say how many streams the store holds."""
        return f"<InMemoryStore with {len(self._streams)} streams>"

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Append ``events`` after ``expected_version`` atomically; the version the last holds."""
        self._check_open()
        _check_stream_id(stream_id)
        _check_version("expected_version", expected_version)
        batch = _encode_batch(self._registry, events, event_ids)
        with self._lock:
            found = [self._stored(pending.event_id) for pending in batch]
            replayed = _replayed_version(stream_id, expected_version, batch, found)
            if replayed is not None:
                return replayed
            rows = self._streams.get(stream_id, [])
            if len(rows) != expected_version:
                raise VersionConflict(stream_id, expected_version, len(rows))
            if not batch:
                return expected_version
            self._check_tip(stream_id, rows)
            recorded = _stamp(self._times.get(stream_id))
            recorded_at = recorded.isoformat()
            rows = self._streams.setdefault(stream_id, rows)
            chain = rows[-1].chain if rows else _genesis(stream_id)
            for version, pending in enumerate(batch, len(rows) + 1):
                chain = _link(chain, version, *pending, recorded_at)
                rows.append(_Row(version, *pending, recorded_at, chain))
                self._positions[pending.event_id] = (stream_id, version)
            self._heads[stream_id] = _Head(len(rows), chain, 0)
            self._times[stream_id] = recorded
            return len(rows)

    def read(
        self, stream_id: str, *, first: int = 1, last: int | None = None
    ) -> Iterator[RecordedEvent]:
        """The stream's events from version ``first`` to ``last`` (inclusive), in order."""
        self._check_open()
        _check_stream_id(stream_id)
        _check_range(first, last)
        return self._read(stream_id, first, last)

    def _read(self, stream_id: str, first: int, last: int | None) -> Iterator[RecordedEvent]:
        decode = self._registry.decode
        for row, recorded_at in self._rows(stream_id, first, last):
            try:
                event = decode(row.type_tag, row.schema_version, row.data)
            except EventDecodeError as exc:
                exc.add_note(f"while reading stream {stream_id!r} at version {row.version}")
                raise
            yield RecordedEvent(
                stream_id=stream_id,
                version=row.version,
                event_id=row.event_id,
                recorded_at=recorded_at,
                event=event,
            )

    def _rows(
        self, stream_id: str, first: int, last: int | None
    ) -> Iterator[tuple[_Row, datetime]]:
        """The stream's rows from ``first``, checked as SQLiteStore checks its file."""
        # The list and the head as they are now: an append while reading adds to the list
        # past this head, and the read stops at the head, as a file's snapshot would.
        rows = self._streams.get(stream_id, [])
        head = self._heads.get(stream_id)
        end = _NO_LAST if last is None else last
        check = _StreamCheck(_IN_MEMORY, stream_id, first, end)
        if head is None:
            if rows:
                raise check.damaged(1, "the stream has events but no recorded head")
            return
        check.set_head(head)
        if first > 1:
            before = rows[first - 2] if first - 2 < len(rows) else None
            check.anchor(None if before is None else (before.chain, before.recorded_at))
        for index in range(first - 1, min(end, head.version)):
            self._check_open()
            if index >= len(rows):
                break
            row = rows[index]
            recorded_at = check.row(row)
            if recorded_at is None:
                break
            yield row, recorded_at
        check.end()

    def verify(self, stream_id: str) -> int:
        """Check the whole stream without decoding its events; its version if it is intact."""
        self._check_open()
        _check_stream_id(stream_id)
        count = 0
        for row, _ in self._rows(stream_id, 1, None):
            count = row.version
        rows = self._streams.get(stream_id, [])
        if len(rows) > count:
            raise _StreamCheck(_IN_MEMORY, stream_id, 1, _NO_LAST).damaged(
                count + 1, f"a row with version {rows[count].version!r} lies past the head"
            )
        return count

    def version(self, stream_id: str) -> int:
        """The stream's current version: how many events it holds (0 if none)."""
        self._check_open()
        _check_stream_id(stream_id)
        rows = self._streams.get(stream_id, [])
        self._check_tip(stream_id, rows)
        return len(rows)

    def streams(self) -> list[str]:
        """The ids of the streams holding at least one event, sorted."""
        self._check_open()
        return sorted(self._streams.keys() | self._heads.keys())

    def save_snapshot(self, stream_id: str, version: int, state: dict[str, Any]) -> None:
        """Keep a JSON-encodable ``state`` folded from the stream up to ``version``."""
        self._check_open()
        _check_stream_id(stream_id)
        _check_version("a snapshot version", version)
        data = _encode_state(state)
        with self._lock:
            current = len(self._streams.get(stream_id, ()))
            if version > current:
                raise UsageError(
                    f"stream {stream_id!r} is at version {current}; a snapshot at version "
                    f"{version} would be ahead of its events"
                )
            self._snapshots.setdefault(stream_id, {})[version] = data

    def load_snapshot(self, stream_id: str, *, at_most: int | None = None) -> Snapshot | None:
        """The latest snapshot of the stream at or below version ``at_most``, if any."""
        self._check_open()
        _check_stream_id(stream_id)
        if at_most is not None:
            _check_version("at_most", at_most)
        saved = self._snapshots.get(stream_id, {})
        version = max((v for v in saved if at_most is None or v <= at_most), default=None)
        if version is None:
            return None
        state = _decode_state(saved[version])
        if isinstance(state, str):
            raise CorruptStoreError(
                _IN_MEMORY, f"the snapshot of {stream_id!r} at version {version} is damaged", state
            )
        return Snapshot(stream_id=stream_id, version=version, state=state)

    def close(self) -> None:
        """Drop everything the store holds; using it afterwards raises :class:`StoreError`."""
        self._closed = True
        self._streams = {}
        self._heads = {}
        self._times = {}
        self._positions = {}
        self._snapshots = {}

    def __enter__(self) -> Self:
        """The store itself, closed when the ``with`` block ends."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the store."""
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise _store_closed()

    def _check_tip(self, stream_id: str, rows: list[_Row]) -> None:
        """Refuse to go on from a stream whose last row is not the one its head records."""
        head = self._heads.get(stream_id)
        if head is None and not rows:
            return
        if (
            head is None
            or len(rows) != head.version
            or rows[-1].version != head.version
            or rows[-1].chain != head.chain
        ):
            self.verify(stream_id)
            raise _StreamCheck(_IN_MEMORY, stream_id, 1, _NO_LAST).damaged(
                1, "its recorded head does not match its events"
            )

    def _stored(self, event_id: str) -> _Stored | None:
        position = self._positions.get(event_id)
        if position is None:
            return None
        stream_id, version = position
        row = self._streams[stream_id][version - 1]
        return _Stored(stream_id, version, row.type_tag, row.schema_version, row.data)
