"""The event stores: the shared contract, plus what only the SQLite file store does."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import TYPE_CHECKING

import attrs
import pytest

from cprfsm import _store_sqlite
from cprfsm.events import Event, EventRegistry
from cprfsm.exceptions import (
    CorruptStoreError,
    ForeignStoreError,
    NewerStoreError,
    StoreError,
    StoreNotFoundError,
    UnknownEventTypeError,
    UsageError,
    VersionConflict,
)
from cprfsm.store import EventStore, InMemoryStore, SQLiteStore
from cprfsm.testing.contract import EventStoreContract

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

_registry = EventRegistry()


@_registry.event("tests.store.noted")
@attrs.frozen(kw_only=True)
class Noted(Event):
    """A test event carrying some text."""

    text: str


def _notes(count: int) -> list[Event]:
    return [Noted(text=f"note {n} " + "x" * 200) for n in range(count)]


class TestInMemoryStore(EventStoreContract):
    """The contract, for the store that lives in memory."""

    def make_store(self, path: Path, registry: EventRegistry) -> EventStore:  # noqa: ARG002
        """A new in-memory store; ``path`` is not used."""
        return InMemoryStore(registry=registry)

    def damage_event(self, store: EventStore, path: Path, stream_id: str, version: int) -> None:  # noqa: ARG002
        """Edit the kept row's payload in place."""
        assert isinstance(store, InMemoryStore)
        rows = store._streams[stream_id]
        row = rows[version - 1]
        rows[version - 1] = row._replace(data=row.data.replace('"n":', '"n": '))


class TestSQLiteStore(EventStoreContract):
    """The contract, for the SQLite file store, including reopening and several processes."""

    persistent = True

    def make_store(self, path: Path, registry: EventRegistry) -> EventStore:
        """The SQLite store at ``path``."""
        return SQLiteStore(path, registry=registry)

    def damage_event(self, store: EventStore, path: Path, stream_id: str, version: int) -> None:  # noqa: ARG002
        """Edit the row's payload with a raw sqlite3 connection."""
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute(
            "UPDATE events SET data = replace(data, '\"n\":', '\"n\": ')"
            " WHERE stream_id = ? AND version = ?",
            (stream_id, version),
        )
        connection.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecars(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name + "-")]


def _store_file(path: Path, events: int = 200) -> Path:
    with SQLiteStore(path, registry=_registry) as store:
        store.append("vm", _notes(events), expected_version=0)
    return path


class TestOpeningFiles:
    """A file that is not a usable store is refused with a StoreError, and left untouched."""

    def _refused(self, path: Path, error: type[StoreError], *, create: bool = True) -> StoreError:
        before = _digest(path) if path.is_file() else None
        with pytest.raises(error) as caught:
            SQLiteStore(path, create=create, registry=_registry)
        assert str(path) in str(caught.value)
        if before is not None:
            assert _digest(path) == before
            assert _sidecars(path) == []
        return caught.value

    def test_missing_file_without_create(self, tmp_path: Path) -> None:
        """Opening a missing path with create=False raises and creates no file."""
        path = tmp_path / "missing.sqlite"
        error = self._refused(path, StoreNotFoundError, create=False)
        assert "create=True" in str(error)
        assert not path.exists()

    def test_empty_file_without_create(self, tmp_path: Path) -> None:
        """An empty file is no store when create=False, and stays empty."""
        path = tmp_path / "empty.sqlite"
        path.touch()
        self._refused(path, StoreNotFoundError, create=False)
        assert path.stat().st_size == 0

    def test_empty_file_becomes_a_store(self, tmp_path: Path) -> None:
        """An empty file is a new store when create is left on."""
        path = tmp_path / "empty.sqlite"
        path.touch()
        with SQLiteStore(path, registry=_registry) as store:
            store.append("vm", _notes(1), expected_version=0)
        with SQLiteStore(path, create=False, registry=_registry) as store:
            assert store.version("vm") == 1

    def test_random_bytes(self, tmp_path: Path) -> None:
        """A file of random bytes is refused as foreign."""
        path = tmp_path / "random.bin"
        path.write_bytes(os.urandom(8192))
        error = self._refused(path, ForeignStoreError)
        assert "not an SQLite database" in str(error)

    def test_text_file(self, tmp_path: Path) -> None:
        """A short text file is refused as foreign."""
        path = tmp_path / "notes.txt"
        path.write_text("hello\n")
        self._refused(path, ForeignStoreError)

    def test_directory(self, tmp_path: Path) -> None:
        """A directory is refused as foreign."""
        self._refused(tmp_path, ForeignStoreError)

    def test_unrelated_sqlite_database(self, tmp_path: Path) -> None:
        """Another program's SQLite database is refused as foreign, byte for byte unchanged."""
        path = tmp_path / "other.sqlite"
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
            connection.execute("INSERT INTO accounts (name) VALUES ('alice')")
        connection.close()
        error = self._refused(path, ForeignStoreError)
        assert "another application" in str(error)

    def test_database_with_another_application_id(self, tmp_path: Path) -> None:
        """A database stamped with another application id is refused, naming that id."""
        path = tmp_path / "stamped.sqlite"
        connection = sqlite3.connect(path)
        connection.execute("PRAGMA application_id = 1234")
        connection.execute("CREATE TABLE events (x)")
        connection.commit()
        connection.close()
        assert "0x4d2" in str(self._refused(path, ForeignStoreError))

    def test_newer_schema(self, tmp_path: Path) -> None:
        """A store from a newer schema is refused with advice to upgrade cprfsm."""
        path = _store_file(tmp_path / "newer.sqlite")
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {_store_sqlite._SCHEMA_VERSION + 1}")
        connection.commit()
        connection.close()
        assert "upgrade cprfsm" in str(self._refused(path, NewerStoreError))

    def test_truncated_store(self, tmp_path: Path) -> None:
        """A store cut short is refused as corrupt."""
        path = _store_file(tmp_path / "cut.sqlite")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert "truncated" in str(self._refused(path, CorruptStoreError))

    def test_store_cut_inside_its_header(self, tmp_path: Path) -> None:
        """A store cut inside its 100-byte header is refused as corrupt, not foreign."""
        path = _store_file(tmp_path / "stub.sqlite")
        path.write_bytes(path.read_bytes()[:50])
        self._refused(path, CorruptStoreError)

    def test_damaged_schema_page(self, tmp_path: Path) -> None:
        """A store whose schema page is overwritten is refused as corrupt when opened."""
        path = _store_file(tmp_path / "damaged.sqlite")
        data = bytearray(path.read_bytes())
        data[100:1024] = os.urandom(924)
        path.write_bytes(bytes(data))
        before = _digest(path)
        with pytest.raises(CorruptStoreError):
            SQLiteStore(path, registry=_registry)
        assert _digest(path) == before

    def test_damaged_event_pages_are_reported_when_read(self, tmp_path: Path) -> None:
        """Damage past the schema surfaces as CorruptStoreError naming the file."""
        path = _store_file(tmp_path / "damaged.sqlite")
        data = bytearray(path.read_bytes())
        page_size = int.from_bytes(data[16:18])
        data[2 * page_size :] = b"\xff" * (len(data) - 2 * page_size)
        path.write_bytes(bytes(data))
        with (
            pytest.raises(CorruptStoreError) as caught,
            SQLiteStore(path, registry=_registry) as store,
        ):
            list(store.read("vm"))
        assert str(path) in str(caught.value)


class TestSQLiteStoreFile:
    """How the SQLite store sets up and uses its file."""

    def test_new_file_is_stamped_and_in_wal_mode(self, tmp_path: Path) -> None:
        """A new store carries cprfsm's application id and schema version and uses WAL."""
        path = tmp_path / "new.sqlite"
        SQLiteStore(path, registry=_registry).close()
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        pragmas = [
            connection.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("application_id", "user_version", "journal_mode")
        ]
        connection.close()
        assert pragmas == [_store_sqlite._APPLICATION_ID, _store_sqlite._SCHEMA_VERSION, "wal"]

    @pytest.mark.parametrize(("synchronous", "level"), [("FULL", 2), ("NORMAL", 1)])
    def test_synchronous_setting(self, tmp_path: Path, synchronous: str, level: int) -> None:
        """Appends are fsynced per commit (FULL) unless NORMAL is asked for."""
        store = SQLiteStore(tmp_path / "s.sqlite", synchronous=synchronous, registry=_registry)  # type: ignore[arg-type]
        with store:
            assert store._open_connection().execute("PRAGMA synchronous").fetchone()[0] == level

    def test_default_is_full(self, tmp_path: Path) -> None:
        """Without options every commit is durable (synchronous=FULL)."""
        with SQLiteStore(tmp_path / "s.sqlite", registry=_registry) as store:
            assert store._open_connection().execute("PRAGMA synchronous").fetchone()[0] == 2

    def test_unknown_synchronous_setting_is_refused(self, tmp_path: Path) -> None:
        """Only FULL and NORMAL are accepted, before any file is created."""
        path = tmp_path / "s.sqlite"
        with pytest.raises(UsageError):
            SQLiteStore(path, synchronous="OFF", registry=_registry)  # type: ignore[arg-type]
        assert not path.exists()

    def test_primary_key_backs_up_the_version_check(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If the version check were fooled, the (stream, version) key still refuses the batch."""
        with SQLiteStore(tmp_path / "s.sqlite", registry=_registry) as store:
            store.append("vm", _notes(2), expected_version=0)
            real: Callable[[sqlite3.Connection, str], int] = _store_sqlite._current_version
            answers = iter([1])
            monkeypatch.setattr(
                _store_sqlite,
                "_current_version",
                lambda connection, stream: next(answers, None) or real(connection, stream),
            )
            with pytest.raises(VersionConflict) as caught:
                store.append("vm", _notes(3), expected_version=1)
            assert caught.value.actual == 2
            assert store.version("vm") == 2

    def test_unknown_event_type_names_stream_and_version(self, tmp_path: Path) -> None:
        """An event stored under an unknown tag fails to decode, saying where it sits."""
        path = _store_file(tmp_path / "s.sqlite", events=1)
        with (
            SQLiteStore(path, registry=EventRegistry()) as store,
            pytest.raises(UnknownEventTypeError) as caught,
        ):
            list(store.read("vm"))
        assert caught.value.type_tag == "tests.store.noted"
        assert any("stream 'vm' at version 1" in note for note in caught.value.__notes__)

    def test_repr_names_the_file(self, tmp_path: Path) -> None:
        """The store's repr shows its path."""
        path = tmp_path / "s.sqlite"
        with SQLiteStore(path, registry=_registry) as store:
            assert str(path) in repr(store)
            assert store.path == path
