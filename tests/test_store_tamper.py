"""Hostile files: a damaged log is reported at its first bad version, and reads change nothing."""

# ruff: noqa: S608 - the tests edit store files with raw SQL on purpose

from __future__ import annotations

import os
import shutil
import sqlite3
from typing import TYPE_CHECKING

import pytest
from test_cli_log import fill_stop_cont

from cprfsm import vm_events as ev
from cprfsm.cli import main
from cprfsm.exceptions import (
    CorruptStoreError,
    DamagedStreamError,
    ForeignStoreError,
    LogMismatchError,
    StoreFileError,
    StoreNotFoundError,
    UsageError,
)
from cprfsm.lifecycle import replay
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from pathlib import Path


VM = "vm"
EVENTS = 20


def _store(path: Path, count: int = EVENTS) -> Path:
    with SQLiteStore(path) as store:
        fill_stop_cont(store, VM, count)
    return path


def _sql(path: Path, *statements: str) -> None:
    """Edit the file behind the store's back, as a raw sqlite3 user would."""
    connection = sqlite3.connect(path, isolation_level=None)
    for statement in statements:
        connection.execute(statement)
    connection.close()


def _where(version: int) -> str:
    return f"stream_id = '{VM}' AND version = {version}"


# name -> (edits, the first bad version)
TAMPERS: dict[str, tuple[tuple[str, ...], int]] = {
    "delete-last": ((f"DELETE FROM events WHERE {_where(EVENTS)}",), EVENTS),
    "delete-two-last": ((f"DELETE FROM events WHERE version >= {EVENTS - 1}",), EVENTS - 1),
    "delete-middle": ((f"DELETE FROM events WHERE {_where(7)}",), 7),
    "swap": (
        (
            f"UPDATE events SET version = -7 WHERE {_where(7)}",
            f"UPDATE events SET version = 7 WHERE {_where(8)}",
            "UPDATE events SET version = 8 WHERE version = -7",
        ),
        7,
    ),
    "duplicate-at-end": (
        (
            (
                "INSERT INTO events SELECT stream_id, version + 1, event_id || 'x', type,"
                f" schema_version, data, recorded_at, chain FROM events WHERE {_where(EVENTS)}"
            ),
        ),
        EVENTS + 1,
    ),
    "shift-100": (("UPDATE events SET version = version + 100",), 1),
    "negative": ((f"UPDATE events SET version = -5 WHERE {_where(5)}",), 5),
    "edit-data": (
        (f"UPDATE events SET data = replace(data, 'paused', 'pausex') WHERE {_where(4)}",),
        4,
    ),
    "garbage-time": ((f"UPDATE events SET recorded_at = 'yesterday' WHERE {_where(3)}",), 3),
    "time-backwards": (
        (f"UPDATE events SET recorded_at = '2000-01-01T00:00:00+00:00' WHERE {_where(9)}",),
        9,
    ),
    "text-version": ((f"UPDATE events SET version = 'six' WHERE {_where(6)}",), 6),
    "deep-json": (
        (f"UPDATE events SET data = '{'[' * 200_000}{']' * 200_000}' WHERE {_where(2)}",),
        2,
    ),
    "head-deleted": (("DELETE FROM heads",), 1),
    "all-rows-deleted": (("DELETE FROM events",), 1),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_log_names_its_first_bad_version(tmp_path: Path, name: str) -> None:
    """Each raw edit is reported as DamagedStreamError at the first bad version, by every read."""
    edits, bad = TAMPERS[name]
    path = _store(tmp_path / "s.sqlite")
    _sql(path, *edits)
    for read_only in (True, False):
        with SQLiteStore(path, read_only=read_only) as store:
            with pytest.raises(DamagedStreamError) as caught:
                store.verify(VM)
            assert (caught.value.stream, caught.value.version) == (VM, bad)
            assert str(path) in str(caught.value)
            with pytest.raises(CorruptStoreError):  # noqa: PT012 - whichever sees it first
                store.version(VM)
                list(store.read(VM))


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_log_is_refused_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """log and replay (also --at before the damage) exit 2 with one line, and change nothing."""
    edits, bad = TAMPERS[name]
    path = _store(tmp_path / "s.sqlite")
    _sql(path, *edits)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for argv in (["log"], ["log", "--json"], ["replay"], ["replay", "--at", "1"]):
        status = main([*argv, str(path)])
        out, err = capsys.readouterr()
        assert (status, out) == (2, "")
        assert err.count("\n") == 1
        assert f"damaged at version {bad}" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_writer_refuses_to_append_to_a_damaged_stream(tmp_path: Path) -> None:
    """An append after a deleted tail is refused instead of chaining onto the damage."""
    path = _store(tmp_path / "s.sqlite")
    _sql(path, f"DELETE FROM events WHERE {_where(EVENTS)}")
    with SQLiteStore(path) as store, pytest.raises(DamagedStreamError) as caught:
        store.append(
            VM, [ev.VmStopped(runstate="paused", was_suspended=False)], expected_version=19
        )
    assert caught.value.version == EVENTS


def test_snapshot_of_an_array_is_corrupt(tmp_path: Path) -> None:
    """A snapshot whose state is not a JSON object is a CorruptStoreError, not a traceback."""
    path = _store(tmp_path / "s.sqlite")
    for state in ("[]", "[" * 100_000, "not json"):
        _sql(path, f"INSERT OR REPLACE INTO snapshots VALUES ('{VM}', 3, '{state}')")
        with SQLiteStore(path, read_only=True) as store, pytest.raises(CorruptStoreError):
            store.load_snapshot(VM)


def test_non_utf8_names_are_corrupt(tmp_path: Path) -> None:
    """Text that is not UTF-8, in a table name or a stream id, is a CorruptStoreError."""
    path = _store(tmp_path / "s.sqlite")
    _sql(path, "UPDATE events SET stream_id = CAST(x'ff00ff' AS TEXT) WHERE version = 1")
    with SQLiteStore(path, read_only=True) as store, pytest.raises(CorruptStoreError):
        store.streams()
    other = _store(tmp_path / "t.sqlite")
    _sql(
        other,
        'CREATE TABLE "x" (a)',
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET name = CAST(x'ff' AS TEXT) WHERE name = 'x'",
    )
    with pytest.raises(CorruptStoreError):
        SQLiteStore(other, read_only=True)


def test_second_start_while_running_is_a_log_mismatch() -> None:
    """Replaying qemu.started while QEMU runs is a LogMismatchError, not a silent restart."""
    started = ev.QemuStarted(
        incarnation=1,
        qemu_version="10.0",
        host_boot=1,
        paused=False,
        incoming=False,
        runstate="running",
        memory="ram",
        devices=(),
        aux_ram_share=False,
    )
    with pytest.raises(LogMismatchError, match=r"event 2 .*still runs"):
        replay(VM, [started, started])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _other_wal(folder: Path, name: str, *, cprfsm_store: bool) -> Path:
    """A write-ahead log (and -shm) of another database, left by a process still running."""
    path = folder / name
    if cprfsm_store:
        writer = SQLiteStore(path)
        fill_stop_cont(writer, "other", 30)
    else:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES (1)")
    copy = folder / "copied"
    copy.mkdir()
    for suffix in ("-wal", "-shm"):
        shutil.copyfile(f"{path}{suffix}", copy / f"x{suffix}")
    return copy


class TestReadOnly:
    """Read-only opens (and so cprfsm log and replay) never change a byte or add a file."""

    @pytest.mark.parametrize("command", [["log"], ["log", "--json"], ["replay", "--at", "3"]])
    def test_clean_store_is_left_byte_for_byte(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """A closed store reads without a -wal or -shm appearing."""
        path = _store(tmp_path / "s.sqlite")
        before = _files(tmp_path)
        assert main([*command, str(path)]) == 0
        capsys.readouterr()
        assert _files(tmp_path) == before

    def test_rollback_journal_store_stays_in_its_mode(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A store in rollback-journal mode is read as it is, not converted to WAL."""
        path = _store(tmp_path / "s.sqlite")
        _sql(path, "PRAGMA journal_mode=DELETE")
        before = _files(tmp_path)
        assert main(["replay", str(path)]) == 0
        assert main(["log", str(path)]) == 0
        capsys.readouterr()
        assert _files(tmp_path) == before
        (tmp_path / "s.sqlite-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" * 64)
        before = _files(tmp_path)
        with pytest.raises(StoreFileError, match="unfinished transaction"):
            SQLiteStore(path, read_only=True)
        assert _files(tmp_path) == before

    def test_live_writer_wal_is_read(self, tmp_path: Path) -> None:
        """Events still in a running writer's -wal are read, from a private copy."""
        path = tmp_path / "s.sqlite"
        with SQLiteStore(path) as writer:
            fill_stop_cont(writer, VM, 50)
            assert (tmp_path / "s.sqlite-wal").stat().st_size > 0
            before = _files(tmp_path)
            with SQLiteStore(path, read_only=True) as reader:
                assert reader.verify(VM) == 50
                assert [r.version for r in reader.read(VM)] == list(range(1, 51))
            assert _files(tmp_path) == before

    @pytest.mark.parametrize("cprfsm_store", [True, False])
    def test_foreign_wal_is_refused_untouched(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], *, cprfsm_store: bool
    ) -> None:
        """Another database's -wal and -shm beside the store: refused, nothing changed."""
        folder = tmp_path / "store"
        folder.mkdir()
        path = _store(folder / "s.sqlite")
        copied = _other_wal(tmp_path, "other.sqlite", cprfsm_store=cprfsm_store)
        for suffix in ("-wal", "-shm"):
            shutil.copyfile(copied / f"x{suffix}", folder / f"s.sqlite{suffix}")
        before = _files(folder)
        for command in ("log", "replay"):
            assert main([command, str(path)]) == 2
            out, err = capsys.readouterr()
            assert out == ""
            assert "is not its own" in err
            assert err.count("\n") == 1
        with pytest.raises(ForeignStoreError):
            SQLiteStore(path, read_only=True)
        assert _files(folder) == before
        (folder / "s.sqlite-wal").unlink()
        with SQLiteStore(path, read_only=True) as store:
            assert store.verify(VM) == EVENTS

    def test_read_only_store_refuses_writes(self, tmp_path: Path) -> None:
        """Appending to or snapshotting a read-only store is a usage error."""
        path = _store(tmp_path / "s.sqlite")
        with SQLiteStore(path, read_only=True) as store:
            with pytest.raises(UsageError, match="read-only"):
                store.append(VM, [], expected_version=EVENTS)
            with pytest.raises(UsageError, match="read-only"):
                store.save_snapshot(VM, 1, {})

    def test_missing_store(self, tmp_path: Path) -> None:
        """A read-only open never creates a store."""
        with pytest.raises(StoreNotFoundError):
            SQLiteStore(tmp_path / "none.sqlite", read_only=True)
        assert list(tmp_path.iterdir()) == []


def _schema_1(path: Path) -> Path:
    """A store as the previous cprfsm wrote it: no chain column, no heads, user_version 1."""
    _store(path)
    _sql(
        path,
        "DROP TABLE heads",
        "ALTER TABLE events DROP COLUMN chain",
        "PRAGMA user_version = 1",
    )
    return path


class TestSchemaOne:
    """Stores of the previous format still open: read as they are, chained on first write."""

    def test_read_only_leaves_it_as_it_is(self, tmp_path: Path) -> None:
        """A read-only open reads a schema 1 store, checks contiguity, and changes nothing."""
        path = _schema_1(tmp_path / "old.sqlite")
        before = _files(tmp_path)
        with SQLiteStore(path, read_only=True) as store:
            assert store.verify(VM) == EVENTS
            assert len(list(store.read(VM))) == EVENTS
        assert _files(tmp_path) == before
        _sql(path, f"DELETE FROM events WHERE {_where(5)}")
        with (
            SQLiteStore(path, read_only=True) as store,
            pytest.raises(DamagedStreamError) as caught,
        ):
            store.verify(VM)
        assert caught.value.version == 5

    def test_first_write_upgrades(self, tmp_path: Path) -> None:
        """The first append chains every event, records heads and sets schema 2."""
        path = _schema_1(tmp_path / "old.sqlite")
        with SQLiteStore(path) as store:
            before = list(store.read(VM))
            store.append(
                VM, [ev.VmStopped(runstate="paused", was_suspended=False)], expected_version=EVENTS
            )
            assert list(store.read(VM, last=EVENTS)) == before
        connection = sqlite3.connect(path)
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
        assert connection.execute(
            "SELECT count(*) FROM events WHERE chain IS NULL"
        ).fetchone() == (0,)
        connection.close()
        _sql(path, f"UPDATE events SET data = replace(data, 'paused', 'pausex') WHERE {_where(2)}")
        with (
            SQLiteStore(path, read_only=True) as store,
            pytest.raises(DamagedStreamError) as caught,
        ):
            store.verify(VM)
        assert caught.value.version == 2

    def test_damaged_old_store_is_not_upgraded(self, tmp_path: Path) -> None:
        """A schema 1 store with a gap is refused on write, and stays schema 1."""
        path = _schema_1(tmp_path / "old.sqlite")
        _sql(path, f"DELETE FROM events WHERE {_where(3)}")
        with SQLiteStore(path) as store, pytest.raises(DamagedStreamError):
            store.save_snapshot(VM, 1, {})
        connection = sqlite3.connect(path)
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
        connection.close()


class TestOpenFailures:
    """Whatever SQLite cannot do while opening is a typed StoreFileError with the path."""

    def test_dev_null(self) -> None:
        """/dev/null is not a store, and is not written."""
        with pytest.raises(ForeignStoreError, match="not a regular file"):
            SQLiteStore("/dev/null")

    def test_directory_at_the_wal(self, tmp_path: Path) -> None:
        """A directory where the -wal goes is a StoreFileError, not an AttributeError."""
        path = _store(tmp_path / "s.sqlite")
        (tmp_path / "s.sqlite-wal").mkdir()
        for read_only in (False, True):
            with pytest.raises(StoreFileError) as caught:
                SQLiteStore(path, read_only=read_only)
            assert str(path) in str(caught.value)

    def test_read_only_directory(self, tmp_path: Path) -> None:
        """A store in a directory nobody may write to: writable open refused, read-only works."""
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories")
        path = _store(tmp_path / "s.sqlite")
        tmp_path.chmod(0o555)
        try:
            with pytest.raises(StoreFileError):
                SQLiteStore(path)
            with pytest.raises(StoreFileError):
                SQLiteStore(tmp_path / "new.sqlite")
            with SQLiteStore(path, read_only=True) as store:
                assert store.verify(VM) == EVENTS
        finally:
            tmp_path.chmod(0o755)

    @pytest.mark.parametrize(
        "code", ["SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN"]
    )
    def test_sqlite_failure_while_opening(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
    ) -> None:
        """A full disk, a read-only mount, an I/O error: typed, naming the path."""
        error = sqlite3.OperationalError(code)
        error.sqlite_errorcode = getattr(sqlite3, code)

        def failing(*_: object, **__: object) -> sqlite3.Connection:
            raise error

        monkeypatch.setattr(sqlite3, "connect", failing)
        with pytest.raises(StoreFileError) as caught:
            SQLiteStore(tmp_path / "s.sqlite")
        assert str(tmp_path / "s.sqlite") in str(caught.value)
