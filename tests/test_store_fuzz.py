"""A store file damaged at random: a typed error or the very same events, never anything else."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_log import fill_stop_cont

from cprfsm.exceptions import CprFsmError
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterator

VM = "vm"
_COLUMNS = (
    "stream_id",
    "version",
    "event_id",
    "type",
    "schema_version",
    "data",
    "recorded_at",
    "chain",
)
_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.floats(allow_nan=False),
)


@pytest.fixture(scope="module")
def original() -> Iterator[tuple[Path, list[Any]]]:
    """A closed store of 40 events and what reading it gives."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.sqlite"
        with SQLiteStore(path) as store:
            fill_stop_cont(store, VM, 40)
        yield path, _outcome(path)


def _outcome(path: Path) -> list[Any]:
    """Every stream's verified events, as the CLI would read them."""
    with SQLiteStore(path, read_only=True) as store:
        return [
            (
                vm,
                store.verify(vm),
                [(r.version, r.event_id, r.recorded_at, r.event) for r in store.read(vm)],
            )
            for vm in store.streams()
        ]


def _same_or_typed(path: Path, expected: list[Any]) -> None:
    try:
        outcome = _outcome(path)
    except CprFsmError:
        return
    assert outcome == expected


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4
    )
)
def test_random_byte_flips(
    original: tuple[Path, list[Any]],
    tmp_path_factory: pytest.TempPathFactory,
    flips: list[tuple[int, int]],
) -> None:
    """Flipping bits anywhere in the file never yields other events or an untyped error."""
    source, expected = original
    path = tmp_path_factory.mktemp("flip") / "s.sqlite"
    data = bytearray(source.read_bytes())
    for position, mask in flips:
        data[position % len(data)] ^= mask
    path.write_bytes(bytes(data))
    _same_or_typed(path, expected)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    table=st.sampled_from(["events", "heads"]),
    column=st.sampled_from(_COLUMNS),
    version=st.integers(1, 41),
    value=_VALUES,
)
def test_random_row_edits(  # noqa: PLR0913, PLR0917 - fixtures plus drawn values
    original: tuple[Path, list[Any]],
    tmp_path_factory: pytest.TempPathFactory,
    table: str,
    column: str,
    version: int,
    value: object,
) -> None:
    """Setting any column of any row to any value never yields other events silently."""
    source, expected = original
    path = tmp_path_factory.mktemp("edit") / "s.sqlite"
    shutil.copyfile(source, path)
    if table == "heads" and column not in {"stream_id", "version", "chain"}:
        column = "legacy"
    where = "version = ?" if table == "events" else "version >= ?"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (value, version))  # noqa: S608
    except sqlite3.IntegrityError:
        return
    finally:
        connection.close()
    _same_or_typed(path, expected)
