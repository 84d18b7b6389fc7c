"""The SQLite event store: one file in WAL mode, safe for several writing processes.

A file is only ever written after its header says it is a cprfsm store of a schema this
code knows, or when it is new or empty; anything else is refused untouched.

Schema 2 makes the log tamper-evident: every event row carries a chain value, BLAKE2b over
the previous row's value and everything the row stores, and a ``heads`` table remembers
each stream's last version and chain value, updated in the same transaction as the rows.
Reads recompute the chain, so a deleted, reordered, duplicated or edited event, or a
deleted tail, is reported as :class:`DamagedStreamError` naming the first bad version.
Schema 1 stores (no chain) are read as they are and upgraded on their first write.

A store opened with ``read_only=True`` is never written, and nothing is created beside it:
see :meth:`SQLiteStore._open_read_only` for how a write-ahead log beside it is handled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import tempfile
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn, Self

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
    _parse_stamp,
    _Pending,
    _replayed_version,
    _stamp,
    _store_closed,
    _Stored,
    _StreamCheck,
    default_registry,
)
from cprfsm.exceptions import (
    CorruptStoreError,
    CprFsmError,
    DamagedStreamError,
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
    from datetime import datetime

    from cprfsm.events import Event, EventRegistry

__all__ = ["SQLiteStore"]

#: ``PRAGMA application_id`` of every cprfsm store: "cprf" in ASCII.
_APPLICATION_ID = 0x63707266
#: ``PRAGMA user_version``: the schema this code writes (it reads 1 too).
_SCHEMA_VERSION = 2
#: The first schema whose events are chained.
_CHAINED = 2

_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100
_WAL_HEADER_SIZE = 32
_NO_LAST = 2**63 - 1
_COPY_ATTEMPTS = 3

_HEADS = """
    CREATE TABLE heads (
        stream_id TEXT NOT NULL PRIMARY KEY,
        version INTEGER NOT NULL,
        chain BLOB NOT NULL,
        legacy INTEGER NOT NULL
    ) WITHOUT ROWID
"""
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
        chain BLOB,
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
    _HEADS,
)

_INSERT = (
    "INSERT INTO events"
    " (stream_id, version, event_id, type, schema_version, data, recorded_at, chain)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SAVE_HEAD = "INSERT OR REPLACE INTO heads (stream_id, version, chain, legacy) VALUES (?, ?, ?, ?)"
# Rows and the head come from one statement, hence one snapshot of the file: the head's
# scalar subqueries run once, when the statement starts.
_READ_CHAINED = """
    SELECT version, event_id, type, schema_version, data, recorded_at, chain,
        (SELECT version FROM heads WHERE stream_id = ?1),
        (SELECT chain FROM heads WHERE stream_id = ?1),
        (SELECT legacy FROM heads WHERE stream_id = ?1)
    FROM events WHERE stream_id = ?1 AND version >= ?2 AND version <= ?3 ORDER BY version
"""
_READ_UNCHAINED = """
    SELECT version, event_id, type, schema_version, data, recorded_at, NULL,
        (SELECT max(version) FROM events WHERE stream_id = ?1), NULL, NULL
    FROM events WHERE stream_id = ?1 AND version >= ?2 AND version <= ?3 ORDER BY version
"""
_ANCHOR = "SELECT chain, recorded_at FROM events WHERE stream_id = ? AND version = ?"
_ANCHOR_UNCHAINED = "SELECT NULL, recorded_at FROM events WHERE stream_id = ? AND version = ?"
# When a read finds no row: did rows the head promises exist, appended since it began?
_EMPTY = """
    SELECT version,
        EXISTS (SELECT 1 FROM events WHERE stream_id = ?1 AND version BETWEEN ?2 AND ?3)
    FROM heads WHERE stream_id = ?1
"""
# The stream's head and the rows bounding it, in one snapshot.
_TIP = """
    SELECT h.version, h.chain, h.legacy,
        (SELECT max(version) FROM events WHERE stream_id = ?1),
        (SELECT min(version) FROM events WHERE stream_id = ?1),
        e.chain, e.recorded_at
    FROM (SELECT ?1 AS id) AS s
    LEFT JOIN heads AS h ON h.stream_id = s.id
    LEFT JOIN events AS e ON e.stream_id = s.id AND e.version = h.version
"""
_BOUNDS = "SELECT max(version), min(version) FROM events WHERE stream_id = ?"
_HEAD_VERSION = "SELECT version FROM heads WHERE stream_id = ?"
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
_HEAD_STREAMS = "SELECT stream_id FROM heads"
_UPGRADE_ROWS = (
    "SELECT version, event_id, type, schema_version, data, recorded_at FROM events"
    " WHERE stream_id = ? ORDER BY version"
)
_SET_CHAIN = "UPDATE events SET chain = ? WHERE stream_id = ? AND version = ?"
_SAVE_SNAPSHOT = "INSERT OR REPLACE INTO snapshots (stream_id, version, state) VALUES (?, ?, ?)"
_LOAD_SNAPSHOT = (
    "SELECT version, state FROM snapshots WHERE stream_id = ? AND version <= ?"
    " ORDER BY version DESC LIMIT 1"
)
_LAST_ROW = (
    "SELECT event_id, type, schema_version, data, recorded_at FROM events"
    " WHERE stream_id = ? AND version = ?"
)

_NOT_A_STORE = "give the path of a cprfsm event store, or a new path to create one"
_RESTORE = "restore it from a backup; cprfsm did not modify it"


class _Tip(NamedTuple):
    """A stream's end as a write sees it, checked against its rows."""

    version: int
    chain: bytes
    legacy: int
    recorded_at: datetime | None


class SQLiteStore:
    """An event store in one SQLite file (WAL mode), shared safely by several processes.

    ``create=False`` refuses a missing or empty file instead of starting a store there.
    ``read_only=True`` opens an existing store for reading only: nothing is written to it
    or created beside it (``cprfsm log`` and ``cprfsm replay`` open stores this way).
    ``synchronous="FULL"`` (the default) makes every append durable once it returns;
    ``"NORMAL"`` is faster and may lose the last appends on a power loss, never corrupt
    the file.  ``busy_timeout`` is how long, in seconds, an append waits for another
    process's write to finish.  A store object belongs to the thread that opened it.
    """

    def __init__(  # noqa: PLR0913 - keyword-only settings of one store
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        read_only: bool = False,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 30.0,
        registry: EventRegistry | None = None,
    ) -> None:
        """Open the store at ``path``, creating it if it is new (and ``create`` is true)."""
        self._connection: sqlite3.Connection | None = None
        self._copy: tempfile.TemporaryDirectory[str] | None = None
        if synchronous not in {"FULL", "NORMAL"}:
            raise UsageError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        self._path = Path(path)
        self._registry = default_registry if registry is None else registry
        self._busy_timeout = busy_timeout
        self._read_only = read_only
        header = _read_header(self._path)
        if header is None and (read_only or not create):
            raise StoreNotFoundError(
                self._path,
                "no event store is there (the file is missing or empty)",
                "give the path of an existing store"
                if read_only
                else "give the path of an existing store, or pass create=True to start one",
            )
        if header is not None:
            _check_header(self._path, header)
        if read_only:
            assert header is not None  # refused just above
            self._connection, self._schema = self._open_read_only(header)
            return
        try:
            connection = sqlite3.connect(self._path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _open_failure(self._path, exc) from exc
        try:
            if header is None:
                _initialise(connection, self._path)
            schema = _check_schema(connection, self._path)
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            connection.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            connection.close()
            raise _open_failure(self._path, exc) from exc
        except BaseException:
            connection.close()
            raise
        if mode != "wal":
            connection.close()
            raise StoreFileError(
                self._path,
                f"cannot be switched to WAL mode (it stays in {mode!r} mode)",
                "make its directory writable, or open it with read_only=True",
            )
        self._schema = schema
        self._connection = connection

    @property
    def path(self) -> Path:
        """The store's file."""
        return self._path

    @property
    def read_only(self) -> bool:
        """Whether the store was opened for reading only."""
        return self._read_only

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
            tip = self._tip(connection, stream_id)
            actual = _current_version(connection, stream_id)
            if actual == expected_version:
                if not batch:
                    return expected_version
                rows, chain = _chained_rows(stream_id, expected_version, tip, batch)
                try:
                    connection.executemany(_INSERT, rows)
                except sqlite3.IntegrityError:
                    # Rows before the clashing one are in the transaction: drop them, and
                    # look at the stream as it is to explain the clash.
                    connection.execute("ROLLBACK")
                    connection.execute("BEGIN IMMEDIATE")
                    actual = _current_version(connection, stream_id)
                else:
                    version = expected_version + len(batch)
                    connection.execute(_SAVE_HEAD, (stream_id, version, chain, tip.legacy))
                    return version
            found = _find_stored(connection, batch)
            replayed = _replayed_version(stream_id, expected_version, batch, found)
            if replayed is None:
                raise VersionConflict(stream_id, expected_version, actual)
            return replayed

    def read(
        self, stream_id: str, *, first: int = 1, last: int | None = None
    ) -> Iterator[RecordedEvent]:
        """The stream's events from version ``first`` to ``last`` (inclusive), in order.

        Events are read, checked against the chain and decoded as the iterator advances,
        so a long stream never sits in memory whole.  A damaged stream raises
        :class:`DamagedStreamError` at its first bad version.
        """
        connection = self._open_connection()
        _check_stream_id(stream_id)
        _check_range(first, last)
        return self._read(connection, stream_id, first, _NO_LAST if last is None else last)

    def _read(
        self, connection: sqlite3.Connection, stream_id: str, first: int, last: int
    ) -> Iterator[RecordedEvent]:
        decode = self._registry.decode
        for version, event_id, type_tag, schema_version, data, recorded_at in self._rows(
            connection, stream_id, first, last
        ):
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

    def _rows(
        self, connection: sqlite3.Connection, stream_id: str, first: int, last: int
    ) -> Iterator[tuple[int, str, str, int, str, datetime]]:
        """The stream's checked rows, undecoded."""
        check = _StreamCheck(self._path, stream_id, first, last)
        try:
            chained = self._chained(connection)
            if first > 1:
                anchor = _ANCHOR if chained else _ANCHOR_UNCHAINED
                check.anchor(connection.execute(anchor, (stream_id, first - 1)).fetchone())
            statement = _READ_CHAINED if chained else _READ_UNCHAINED
            cursor = connection.execute(statement, (stream_id, first, last))
            try:
                seen = False
                for row in cursor:
                    if not seen:
                        seen = True
                        _set_head(check, row[7:], chained=chained)
                    recorded_at = check.row(row[:7])
                    if recorded_at is None:
                        break
                    yield (*row[:5], recorded_at)
            finally:
                cursor.close()
            if seen:
                check.end()
            elif chained and first <= last:
                _check_empty(connection, check, first, last)
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc
        except UnicodeDecodeError:
            raise _not_utf8(self._path) from None

    def verify(self, stream_id: str) -> int:
        """Check the whole stream without decoding its events; its version if it is intact.

        Raises :class:`DamagedStreamError` naming the first bad version when an event was
        deleted, reordered, duplicated, edited or added behind the store's back.
        """
        connection = self._open_connection()
        _check_stream_id(stream_id)
        count = 0
        for count, *_ in self._rows(connection, stream_id, 1, _NO_LAST):  # noqa: B007
            pass
        try:
            bounds = self._bounds(connection, stream_id)
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc
        if bounds is not None:
            raise DamagedStreamError(self._path, stream_id, *bounds)
        return count

    def version(self, stream_id: str) -> int:
        """The stream's current version: how many events it holds (0 if none)."""
        connection = self._open_connection()
        _check_stream_id(stream_id)
        try:
            if self._chained(connection):
                return self._tip(connection, stream_id).version
            top, bottom = connection.execute(_BOUNDS, (stream_id,)).fetchone()
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc
        if top is None:
            return 0
        if type(top) is not int or bottom != 1:
            self._diagnose(stream_id)
        version: int = top
        return version

    def streams(self) -> list[str]:
        """The ids of the streams holding at least one event, sorted."""
        connection = self._open_connection()
        try:
            found = {stream_id for (stream_id,) in connection.execute(_STREAMS)}
            if self._chained(connection):
                # A stream whose events were all deleted still has its head.
                found.update(stream_id for (stream_id,) in connection.execute(_HEAD_STREAMS))
        except sqlite3.Error as exc:
            raise self._translated(exc) from exc
        except UnicodeDecodeError:
            raise _not_utf8(self._path) from None
        if not all(type(stream_id) is str and stream_id for stream_id in found):
            raise CorruptStoreError(self._path, "holds a stream id that is not text", _RESTORE)
        return sorted(found)

    def save_snapshot(self, stream_id: str, version: int, state: dict[str, Any]) -> None:
        """Keep a JSON-encodable ``state`` folded from the stream up to ``version``."""
        _check_stream_id(stream_id)
        _check_version("a snapshot version", version)
        data = _encode_state(state)
        with self._writing() as connection:
            current = self._tip(connection, stream_id).version
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
        state = _decode_state(data)
        if isinstance(state, str) or type(version) is not int or version < 0:
            why = state if isinstance(state, str) else f"its version {version!r} is not one"
            raise CorruptStoreError(
                self._path,
                f"the snapshot of {stream_id!r} at version {version!r} is damaged: {why}",
                _RESTORE,
            )
        return Snapshot(stream_id=stream_id, version=version, state=state)

    def close(self) -> None:
        """Close the file; using the store afterwards raises :class:`StoreError`."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None

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

    def _chained(self, connection: sqlite3.Connection) -> bool:
        """Whether the store's events are chained; another process may have upgraded it."""
        if self._schema < _CHAINED and not self._read_only:
            self._schema = connection.execute("PRAGMA user_version").fetchone()[0]
        return self._schema >= _CHAINED

    def _tip(self, connection: sqlite3.Connection, stream_id: str) -> _Tip:
        """The stream's head, after checking it against the stream's last and first rows."""
        row = connection.execute(_TIP, (stream_id,)).fetchone()
        version, chain, legacy, top, bottom, last_chain, stamped = row
        if version is None and top is None:
            return _Tip(0, _genesis(stream_id), 0, None)
        recorded_at = _parse_stamp(stamped)
        if not (
            type(version) is int
            and type(legacy) is int
            and top == version
            and bottom == 1
            and type(chain) is bytes
            and chain == last_chain
            and recorded_at is not None
        ):
            self._diagnose(stream_id)
        return _Tip(version, chain, legacy, recorded_at)

    def _bounds(self, connection: sqlite3.Connection, stream_id: str) -> tuple[int, str] | None:
        """Where and what is wrong around the versions of an intact stream, if anything."""
        if self._chained(connection):
            version, _, _, top, bottom, _, _ = connection.execute(_TIP, (stream_id,)).fetchone()
        else:
            top, bottom = connection.execute(_BOUNDS, (stream_id,)).fetchone()
            version = top
        if top is None and version is None:
            return None
        if top != version:
            after = version + 1 if type(version) is int else 1
            return after, f"a row with version {top!r} lies past the stream's head {version!r}"
        if bottom != 1:
            return 1, f"a row with version {bottom!r} lies before version 1"
        return None

    def _diagnose(self, stream_id: str) -> NoReturn:
        """Raise the error that says where the stream is damaged."""
        self.verify(stream_id)
        raise DamagedStreamError(
            self._path, stream_id, 1, "its recorded head does not match its events"
        )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        connection = self._open_connection()
        if self._read_only:
            raise UsageError(
                f"{os.fspath(self._path)} was opened read-only; open it without "
                "read_only=True to write"
            )
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                if not self._chained(connection):
                    # The first write to a schema 1 store chains its events first, in a
                    # transaction of its own, so the write's own rollback cannot undo it.
                    _upgrade(connection, self._path)
                    connection.execute("COMMIT")
                    self._schema = _SCHEMA_VERSION
                    connection.execute("BEGIN IMMEDIATE")
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
        if self._connection is None and isinstance(exc, sqlite3.ProgrammingError):
            return _store_closed()
        return _open_failure(self._path, exc, self._busy_timeout)

    def _open_read_only(self, header: bytes) -> tuple[sqlite3.Connection, int]:
        """Open the store for reading without changing a byte of it or adding a file.

        - A store in rollback-journal mode, or in WAL mode with no write-ahead log (or an
          empty one) beside it, holds every committed event in its own file: SQLite reads
          it as immutable, with no lock and no ``-shm`` file.
        - A non-empty ``-wal`` may hold committed events not yet copied into the file (a
          writer is running, or was killed).  SQLite cannot tell whether a ``-wal`` belongs
          to the file, and would write a ``-shm`` to read it; so the file and its ``-wal``
          are copied into a private temporary directory and read there.  The ``-wal`` must
          leave a cprfsm store that extends what the file alone holds (every stream's last
          event in the file is still there, unchanged); otherwise it is another
          database's, and the store is refused untouched.
        - A rollback journal beside a store in rollback-journal mode means an unfinished
          transaction only a writer can roll back: refused.
        """
        if header[18] == 1:
            journal = _sidecar(self._path, "-journal")
            if journal is not None and journal.stat().st_size > 0:
                raise StoreFileError(
                    self._path,
                    f"has an unfinished transaction in {journal} that only a writer can undo",
                    "open it once with a writable SQLiteStore if that journal is its own; "
                    "else move the journal away",
                )
            wal = None
        else:
            wal = _sidecar(self._path, "-wal")
        if wal is None or wal.stat().st_size < _WAL_HEADER_SIZE:
            connection = self._connect_read_only(self._path, immutable=True)
            try:
                return connection, _check_schema(connection, self._path)
            except sqlite3.Error as exc:
                connection.close()
                raise _open_failure(self._path, exc) from exc
            except BaseException:
                connection.close()
                raise
        return self._open_copy(wal)

    def _open_copy(self, wal: Path) -> tuple[sqlite3.Connection, int]:
        """Read the store and its ``-wal`` from a private copy, once the ``-wal`` is its own."""
        copy = tempfile.TemporaryDirectory(prefix="cprfsm-read-")
        self._copy = copy
        target = Path(copy.name) / "store.sqlite"
        for _ in range(_COPY_ATTEMPTS):
            before = _fingerprint(self._path), _fingerprint(wal)
            try:
                shutil.copyfile(self._path, target)
                shutil.copyfile(wal, target.with_name(target.name + "-wal"))
            except OSError as exc:
                self.close()
                raise StoreFileError(
                    self._path,
                    f"cannot be copied to read its write-ahead log ({exc.strerror})",
                    "free space in the temporary directory (TMPDIR) and run again",
                ) from None
            if (_fingerprint(self._path), _fingerprint(wal)) == before:
                break
        else:
            self.close()
            raise StoreFileError(
                self._path,
                "kept changing while it was being copied for reading",
                "run the command again when its writer is less busy",
            )
        alone: sqlite3.Connection | None = None
        applied: sqlite3.Connection | None = None
        try:
            alone = self._connect_read_only(self._path, immutable=True)
            applied = self._connect_read_only(target, immutable=False)
            schema = self._check_wal(alone, applied, wal)
        except BaseException:
            if applied is not None:
                applied.close()
            self.close()
            raise
        finally:
            if alone is not None:
                alone.close()
        return applied, schema

    def _check_wal(self, alone: sqlite3.Connection, applied: sqlite3.Connection, wal: Path) -> int:
        """The schema of the store with its ``-wal`` applied; refuse a ``-wal`` not its own."""

        def foreign(why: str) -> ForeignStoreError:
            return ForeignStoreError(
                self._path,
                f"the write-ahead log {wal} beside it is not its own: {why}",
                f"move {wal} away and run again; the store itself was not changed",
            )

        try:
            schema_alone = _check_schema(alone, self._path)
            last = {
                stream_id: alone.execute(_BOUNDS, (stream_id,)).fetchone()[0]
                for (stream_id,) in alone.execute(_STREAMS)
            }
            rows = {s: alone.execute(_LAST_ROW, (s, v)).fetchone() for s, v in last.items()}
        except (sqlite3.Error, CorruptStoreError) as exc:
            raise CorruptStoreError(
                self._path,
                f"cannot be read without its write-ahead log {wal} ({exc})",
                "open it once with a writable SQLiteStore if that log is its own; "
                "else restore it from a backup",
            ) from None
        try:
            application_id = applied.execute("PRAGMA application_id").fetchone()[0]
            if application_id != _APPLICATION_ID:
                raise foreign(
                    f"it turns the file into a database of application {application_id:#x}"
                )
            schema = _check_schema(applied, self._path)
            moved = [
                s
                for s, row in rows.items()
                if applied.execute(_LAST_ROW, (s, last[s])).fetchone() != row
            ]
        except sqlite3.Error as exc:
            raise foreign(f"SQLite cannot apply it ({exc})") from None
        except (CorruptStoreError, NewerStoreError) as exc:
            raise foreign(exc.problem) from None
        if schema < schema_alone:
            raise foreign("it holds an older schema than the file")
        if moved:
            raise foreign(f"stream {moved[0]!r} is not what the file holds")
        return schema

    def _connect_read_only(self, path: Path, *, immutable: bool) -> sqlite3.Connection:
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        uri = f"file:{urllib.parse.quote(os.fspath(path.absolute()))}?{flags}"
        try:
            connection = sqlite3.connect(
                uri, uri=True, timeout=self._busy_timeout, isolation_level=None
            )
            connection.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise _open_failure(self._path, exc) from exc
        return connection


def _check_empty(
    connection: sqlite3.Connection, check: _StreamCheck, first: int, last: int
) -> None:
    """A read found no row: refuse if the head promises rows that are not there."""
    found = connection.execute(_EMPTY, (check.stream, first, last)).fetchone()
    if found is None:
        return
    head, exists = found
    if type(head) is not int:
        raise check.damaged(1, "its recorded head is malformed")
    if head >= first and not exists:
        raise check.damaged(
            first,
            f"versions {first} to {head} are missing: the stream's head records {head} events",
        )


def _set_head(check: _StreamCheck, head: tuple[Any, ...], *, chained: bool) -> None:
    """Give ``check`` the head read with the rows, refusing rows without one."""
    version, chain, legacy = head
    if not chained:
        if type(version) is int:
            check.set_head(_Head(version, None, version))
        return
    if version is None:
        raise check.damaged(1, "the stream has events but no recorded head")
    if type(version) is not int or type(chain) is not bytes or type(legacy) is not int:
        raise check.damaged(1, "its recorded head is malformed")
    check.set_head(_Head(version, chain, legacy))


def _chained_rows(
    stream_id: str, after: int, tip: _Tip, batch: Sequence[_Pending]
) -> tuple[list[tuple[Any, ...]], bytes]:
    """The rows to insert after version ``after``, each chained on from ``tip``.

    ``after`` is the version the head says, unless that check was fooled: the primary key
    then refuses the rows, whatever their chain values.
    """
    recorded_at = _stamp(tip.recorded_at).isoformat()
    chain = tip.chain
    rows = []
    for version, pending in enumerate(batch, after + 1):
        chain = _link(chain, version, *pending, recorded_at)
        rows.append((stream_id, version, *pending, recorded_at, chain))
    return rows, chain


def _current_version(connection: sqlite3.Connection, stream_id: str) -> int:
    row = connection.execute(_HEAD_VERSION, (stream_id,)).fetchone()
    return 0 if row is None else int(row[0])


def _find_stored(
    connection: sqlite3.Connection, batch: Sequence[_Pending]
) -> list[_Stored | None]:
    found: list[_Stored | None] = []
    for pending in batch:
        row = connection.execute(_FIND, (pending.event_id,)).fetchone()
        found.append(None if row is None else _Stored(*row))
    return found


def _upgrade(connection: sqlite3.Connection, path: Path) -> None:
    """Chain the events of a schema 1 store and record each stream's head (schema 2).

    Runs inside the caller's write transaction.  A stream that is not contiguous, or has a
    time that is not one, is refused: the chain would vouch for a damaged log.  Times of
    the events written by schema 1 may go back (it did not order them): each head keeps
    the last such version as ``legacy``.
    """
    connection.execute("ALTER TABLE events ADD COLUMN chain BLOB")
    connection.execute(_HEADS)
    for (stream_id,) in connection.execute(_STREAMS).fetchall():
        if type(stream_id) is not str:
            raise CorruptStoreError(path, "holds a stream id that is not text", _RESTORE)
        check = _StreamCheck(path, stream_id, 1, _NO_LAST)
        updates = []
        chain = _genesis(stream_id)
        rows = connection.execute(_UPGRADE_ROWS, (stream_id,)).fetchall()
        check.set_head(_Head(len(rows), None, len(rows)))
        for version, event_id, type_tag, schema_version, data, stamped in rows:
            check.row((version, event_id, type_tag, schema_version, data, stamped, None))
            chain = _link(chain, version, event_id, type_tag, schema_version, data, stamped)
            updates.append((chain, stream_id, version))
        check.end()
        connection.executemany(_SET_CHAIN, updates)
        connection.execute(_SAVE_HEAD, (stream_id, len(rows), chain, len(rows)))
    connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _open_failure(  # noqa: PLR0911 - one answer per kind of SQLite failure
    path: Path, exc: sqlite3.Error, busy_timeout: float | None = None
) -> CprFsmError:
    """The typed error for an SQLite failure on the store at ``path``."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    wal, shm = (f"{os.fspath(path)}{suffix}" for suffix in ("-wal", "-shm"))
    if code in {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}:
        return CorruptStoreError(path, f"is damaged ({exc})", _RESTORE)
    if "decode to UTF-8" in str(exc):
        return CorruptStoreError(path, f"holds text that is not UTF-8 ({exc})", _RESTORE)
    if code in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
        return StoreFileError(
            path,
            f"another connection kept it locked for over {busy_timeout} s",
            "retry later, or open the store with a longer busy_timeout",
        )
    if code == sqlite3.SQLITE_READONLY:
        return StoreFileError(
            path,
            f"cannot be written: it, its directory or its filesystem is read-only ({exc})",
            "make them writable, or open the store with read_only=True to read it",
        )
    if code == sqlite3.SQLITE_FULL:
        return StoreFileError(
            path, "cannot be written: the disk is full", "free some space and retry"
        )
    if code in {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM}:
        return StoreFileError(
            path,
            f"cannot be opened ({exc})",
            f"check that its directory is writable and that {wal} and {shm}, if present, "
            "are files",
        )
    if isinstance(exc, sqlite3.ProgrammingError):
        return UsageError(f"{os.fspath(path)}: {exc}")
    return StoreFileError(path, f"SQLite failed ({exc})", "check the disk and retry")


def _not_utf8(path: Path) -> CorruptStoreError:
    return CorruptStoreError(path, "holds text that is not UTF-8", _RESTORE)


def _sidecar(path: Path, suffix: str) -> Path | None:
    """The file SQLite keeps beside the store under ``suffix``, if there is one."""
    sidecar = path.with_name(path.name + suffix)
    try:
        mode = sidecar.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreFileError(
            path, f"{sidecar} cannot be read ({exc.strerror})", "check its permissions"
        ) from None
    if not stat.S_ISREG(mode):
        raise StoreFileError(
            path, f"{sidecar} beside it is not a file", f"move {sidecar} away and run again"
        )
    return sidecar


def _fingerprint(path: Path) -> tuple[int, ...]:
    """What changes when a file is written."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _read_header(path: Path) -> bytes | None:
    """The file's first 100 bytes; None when there is no file or it is empty."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ForeignStoreError(path, "is a directory", _NOT_A_STORE)
        if not stat.S_ISREG(mode):
            raise ForeignStoreError(
                path, "is not a regular file (a device, pipe or socket)", _NOT_A_STORE
            )
        with path.open("rb") as file:
            header = file.read(_HEADER_SIZE)
    except FileNotFoundError:
        return None
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
    _check_user_version(path, user_version)
    _check_size(path, header)


def _check_user_version(path: Path, user_version: int) -> None:
    if user_version > _SCHEMA_VERSION:
        raise NewerStoreError(
            path,
            f"was written by a newer cprfsm (store schema {user_version}; this cprfsm "
            f"reads schema {_SCHEMA_VERSION})",
            "upgrade cprfsm to open it",
        )
    if user_version < 1:
        raise CorruptStoreError(path, "has no cprfsm schema version", _RESTORE)


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


def _check_schema(connection: sqlite3.Connection, path: Path) -> int:
    """The store's schema version, once its tables are all there."""
    user_version = connection.execute("PRAGMA user_version").fetchone()[0]
    _check_user_version(path, user_version)
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    needed = {"events", "snapshots", "heads"} if user_version >= _CHAINED else set()
    missing = (needed or {"events", "snapshots"}) - tables
    if missing:
        raise CorruptStoreError(path, f"lacks the tables {sorted(missing)}", _RESTORE)
    schema: int = user_version
    return schema
