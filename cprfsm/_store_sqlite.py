"""The SQLite event store: one file in WAL mode, safe for several writing processes.

A file is only ever written after its header says it is a cprfsm store of a schema this
code knows, or when it is new or empty; anything else is refused untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from cprfsm.events import (
    RecordedEvent,
    Snapshot,
    _check_range,
    _check_stream_id,
    _check_version,
    _encode_batch,
    _encode_state,
    _Pending,
    _replayed_version,
    _store_closed,
    _Stored,
    default_registry,
)
from cprfsm.exceptions import (
    CorruptStoreError,
    CprFsmError,
    EventDecodeError,
    ForeignStoreError,
    NewerStoreError,
    StoreFileError,
    StoreNotFoundError,
    UsageError,
    VersionConflict,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from cprfsm.events import Event, EventRegistry

__all__ = ["SQLiteStore"]

#: ``PRAGMA application_id`` of every cprfsm store: "cprf" in ASCII.
_APPLICATION_ID = 0x63707266
#: ``PRAGMA user_version``: the schema this code reads and writes.
_SCHEMA_VERSION = 1

_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100
_NO_LAST = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SCHEMA = (
    """
    CREATE TABLE events (
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        data TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (stream_id, version)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE snapshots (
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (stream_id, version)
    ) WITHOUT ROWID
    """,
)

_CURRENT = "SELECT max(version) FROM events WHERE stream_id = ?"
_INSERT = (
    "INSERT INTO events (stream_id, version, event_id, type, schema_version, data, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_READ = (
    "SELECT version, event_id, type, schema_version, data, recorded_at FROM events"
    " WHERE stream_id = ? AND version BETWEEN ? AND ? ORDER BY version"
)
_FIND = "SELECT stream_id, version, type, schema_version, data FROM events WHERE event_id = ?"
# Visits one index entry per stream instead of scanning every event.
_STREAMS = """
    WITH RECURSIVE ids(id) AS (
        SELECT min(stream_id) FROM events
        UNION ALL
        SELECT (SELECT min(stream_id) FROM events WHERE stream_id > ids.id)
        FROM ids WHERE ids.id IS NOT NULL
    )
    SELECT id FROM ids WHERE id IS NOT NULL
"""
_SAVE_SNAPSHOT = "INSERT OR REPLACE INTO snapshots (stream_id, version, state) VALUES (?, ?, ?)"
_LOAD_SNAPSHOT = (
    "SELECT version, state FROM snapshots WHERE stream_id = ? AND version <= ?"
    " ORDER BY version DESC LIMIT 1"
)

_NOT_A_STORE = "give the path of a cprfsm event store, or a new path to create one"
_RESTORE = "restore it from a backup; cprfsm did not modify it"


class SQLiteStore:
    """An event store in one SQLite file (WAL mode), shared safely by several processes.

    ``create=False`` refuses a missing or empty file instead of starting a store there.
    ``synchronous="FULL"`` (the default) makes every append durable once it returns;
    ``"NORMAL"`` is faster and may lose the last appends on a power loss, never corrupt
    the file.  ``busy_timeout`` is how long, in seconds, an append waits for another
    process's write to finish.  A store object belongs to the thread that opened it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 30.0,
        registry: EventRegistry | None = None,
    ) -> None:
        """Open the store at ``path``, creating it if it is new (and ``create`` is true)."""
        if synchronous not in {"FULL", "NORMAL"}:
            raise UsageError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        self._path = Path(path)
        self._registry = default_registry if registry is None else registry
        self._busy_timeout = busy_timeout
        header = _read_header(self._path)
        if header is None and not create:
            raise StoreNotFoundError(
                self._path,
                "no event store is there (the file is missing or empty)",
                "give the path of an existing store, or pass create=True to start one",
            )
        if header is not None:
            _check_header(self._path, header)
        try:
            connection = sqlite3.connect(self._path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreFileError(
                self._path, f"cannot be opened ({exc})", "check its directory and permissions"
            ) from exc
        try:
            if header is None:
                _initialise(connection, self._path)
            else:
                _check_schema(connection, self._path)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            connection.close()
            raise self._translated(exc) from exc
        except BaseException:
            connection.close()
            raise
        self._connection: sqlite3.Connection | None = connection

    @property
    def path(self) -> Path:
        """The store's file."""
        return self._path

    def __repr__(self) -> str:
        """Name the store's file."""
        return f"SQLiteStore({os.fspath(self._path)!r})"

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Append ``events`` after ``expected_version`` atomically; the version the last holds."""
        _check_stream_id(stream_id)
        _check_version("expected_version", expected_version)
        batch = _encode_batch(self._registry, events, event_ids)
        with self._writing() as connection:
            actual = _current_version(connection, stream_id)
            if actual == expected_version:
                # Stamped under the write lock, so times never go back along a stream.
                recorded_at = datetime.now(UTC).isoformat()
                rows = [
                    (stream_id, version, *pending, recorded_at)
                    for version, pending in enumerate(batch, expected_version + 1)
                ]
                try:
                    connection.executemany(_INSERT, rows)
                except sqlite3.IntegrityError:
                    # Rows before the clashing one are in the transaction: drop them, and
                    # look at the stream as it is to explain the clash.
                    connection.execute("ROLLBACK")
                    connection.execute("BEGIN IMMEDIATE")
                    actual = _current_version(connection, stream_id)
                else:
                    return expected_version + len(batch)
            found = _find_stored(connection, batch)
            replayed = _replayed_version(stream_id, expected_version, batch, found)
            if replayed is None:
                raise VersionConflict(stream_id, expected_version, actual)
            return replayed

    def read(
        self, stream_id: str, *, first: int = 1, last: int | None = None
    ) -> Iterator[RecordedEvent]:
        """The stream's events from version ``first`` to ``last`` (inclusive), in order.

        Events are read and decoded as the iterator advances, so a long stream never sits
        in memory whole.
        """
        connection = self._open_connection()
        _check_stream_id(stream_id)
        _check_range(first, last)
        return self._read(connection, stream_id, first, _NO_LAST if last is None else last)

    def _read(
        self, connection: sqlite3.Connection, stream_id: str, first: int, last: int
    ) -> Iterator[RecordedEvent]:
        decode = self._registry.decode
        parse_time = datetime.fromisoformat
        stamp: str | None = None
        recorded_at = _EPOCH
        try:
            cursor = connection.execute(_READ, (stream_id, first, last))
            try:
                for version, event_id, type_tag, schema_version, data, stamped in cursor:
                    # A batch shares one timestamp: parse it once per batch.
                    if stamped != stamp:
                        stamp = stamped
                        recorded_at = parse_time(stamped)
                    try:
                        event = decode(type_tag, schema_version, data)
                    except EventDecodeError as exc:
                        exc.add_note(
                            f"while reading stream {stream_id!r} at version {version} "
                            f"of {os.fspath(self._path)}"
                        )
                        raise
                    yield RecordedEvent(
                        stream_id=stream_id,
                        version=version,
                        event_id=event_id,
                        recorded_at=recorded_at,
                        event=event,
                    )
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc

    def version(self, stream_id: str) -> int:
        """The stream's current version: how many events it holds (0 if none)."""
        connection = self._open_connection()
        _check_stream_id(stream_id)
        try:
            return _current_version(connection, stream_id)
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc

    def streams(self) -> list[str]:
        """The ids of the streams holding at least one event, sorted."""
        connection = self._open_connection()
        try:
            return [stream_id for (stream_id,) in connection.execute(_STREAMS)]
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc

    def save_snapshot(self, stream_id: str, version: int, state: dict[str, Any]) -> None:
        """Keep a JSON-encodable ``state`` folded from the stream up to ``version``."""
        _check_stream_id(stream_id)
        _check_version("a snapshot version", version)
        data = _encode_state(state)
        with self._writing() as connection:
            current = _current_version(connection, stream_id)
            if version > current:
                raise UsageError(
                    f"stream {stream_id!r} is at version {current}; a snapshot at version "
                    f"{version} would be ahead of its events"
                )
            connection.execute(_SAVE_SNAPSHOT, (stream_id, version, data))

    def load_snapshot(self, stream_id: str, *, at_most: int | None = None) -> Snapshot | None:
        """The latest snapshot of the stream at or below version ``at_most``, if any."""
        connection = self._open_connection()
        _check_stream_id(stream_id)
        if at_most is not None:
            _check_version("at_most", at_most)
        bound = _NO_LAST if at_most is None else at_most
        try:
            row = connection.execute(_LOAD_SNAPSHOT, (stream_id, bound)).fetchone()
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc
        if row is None:
            return None
        version, data = row
        try:
            state = json.loads(data)
        except ValueError:
            raise CorruptStoreError(
                self._path,
                f"the snapshot of {stream_id!r} at version {version} is damaged",
                _RESTORE,
            ) from None
        return Snapshot(stream_id=stream_id, version=version, state=state)

    def close(self) -> None:
        """Close the file; using the store afterwards raises :class:`StoreError`."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Self:
        """The store itself, closed when the ``with`` block ends."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the store."""
        self.close()

    def _open_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise _store_closed()
        return self._connection

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        connection = self._open_connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            if connection.in_transaction:
                connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc

    def _translated(self, exc: sqlite3.Error) -> CprFsmError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}:
            return CorruptStoreError(self._path, f"is damaged ({exc})", _RESTORE)
        if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
            return StoreFileError(
                self._path,
                f"another connection kept it locked for over {self._busy_timeout} s",
                "retry later, or open the store with a longer busy_timeout",
            )
        if self._connection is None:
            return _store_closed()
        if isinstance(exc, sqlite3.ProgrammingError):
            return UsageError(f"{os.fspath(self._path)}: {exc}")
        return StoreFileError(self._path, f"SQLite failed ({exc})", "check the disk and retry")


def _current_version(connection: sqlite3.Connection, stream_id: str) -> int:
    version: int | None = connection.execute(_CURRENT, (stream_id,)).fetchone()[0]
    return version or 0


def _find_stored(
    connection: sqlite3.Connection, batch: Sequence[_Pending]
) -> list[_Stored | None]:
    found: list[_Stored | None] = []
    for pending in batch:
        row = connection.execute(_FIND, (pending.event_id,)).fetchone()
        found.append(None if row is None else _Stored(*row))
    return found


def _read_header(path: Path) -> bytes | None:
    """The file's first 100 bytes; None when there is no file or it is empty."""
    try:
        with path.open("rb") as file:
            header = file.read(_HEADER_SIZE)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ForeignStoreError(path, "is a directory", _NOT_A_STORE) from None
    except OSError as exc:
        raise StoreFileError(
            path, f"cannot be read ({exc.strerror})", "check the path and its permissions"
        ) from None
    return header or None


def _check_header(path: Path, header: bytes) -> None:
    """Refuse, from its raw header alone, a file that is not a store this code can open."""
    if len(header) < _HEADER_SIZE:
        if _MAGIC.startswith(header[:16]):
            raise CorruptStoreError(
                path, f"is truncated: {len(header)} bytes, less than an SQLite header", _RESTORE
            )
        raise ForeignStoreError(path, "is not an SQLite database", _NOT_A_STORE)
    if not header.startswith(_MAGIC):
        raise ForeignStoreError(path, "is not an SQLite database", _NOT_A_STORE)
    application_id = int.from_bytes(header[68:72])
    user_version = int.from_bytes(header[60:64])
    if application_id != _APPLICATION_ID:
        raise ForeignStoreError(
            path,
            f"is an SQLite database of another application, not a cprfsm event store (its "
            f"application id is {application_id:#x}, not {_APPLICATION_ID:#x})",
            _NOT_A_STORE,
        )
    if user_version > _SCHEMA_VERSION:
        raise NewerStoreError(
            path,
            f"was written by a newer cprfsm (store schema {user_version}; this cprfsm "
            f"reads schema {_SCHEMA_VERSION})",
            "upgrade cprfsm to open it",
        )
    if user_version < 1:
        raise CorruptStoreError(path, "has no cprfsm schema version", _RESTORE)
    _check_size(path, header)


def _check_size(path: Path, header: bytes) -> None:
    page_size = int.from_bytes(header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptStoreError(path, f"has an invalid page size {page_size}", _RESTORE)
    pages = int.from_bytes(header[28:32])
    # SQLite trusts the page count only when the change counter matches "version valid for".
    if pages == 0 or header[24:28] != header[92:96]:
        return
    wal = path.with_name(path.name + "-wal")
    # While a write-ahead log holds pages, the file may legitimately be shorter.
    if wal.exists() and wal.stat().st_size > 0:
        return
    size = path.stat().st_size
    if size < pages * page_size:
        raise CorruptStoreError(
            path, f"is truncated: {size} bytes of the {pages * page_size} it should hold", _RESTORE
        )


def _initialise(connection: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new or empty file, unless another process just did."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        objects = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and objects == 0:
            # The identity goes in before WAL mode is switched on, so it lands in the file's
            # header, where _check_header reads it without SQLite.
            connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute("COMMIT")
            return
        connection.execute("ROLLBACK")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    header = _read_header(path)
    if header is None:
        raise StoreFileError(path, "could not be initialised", "check the disk and retry")
    _check_header(path, header)
    _check_schema(connection, path)


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    missing = {"events", "snapshots"} - tables
    if missing:
        raise CorruptStoreError(path, f"lacks the tables {sorted(missing)}", _RESTORE)
