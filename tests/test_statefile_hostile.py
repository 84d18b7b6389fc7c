"""Hostile state files: damaged or crafted with valid checksums, always a typed error, fast."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from hostile import craft, header_json, within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprfsm import load_model, modelled_releases
from cprfsm.exceptions import (
    CprFsmError,
    InvalidHeader,
    InvalidSection,
    StateFileError,
    TruncatedStateFile,
)
from cprfsm.ports import StreamHeader
from cprfsm.statefile import (
    MAX_HEADER_BYTES,
    MAX_SECTION_NAME,
    QEMU_MODES,
    QEMU_RUNSTATES,
    StateFileReader,
    StateFileWriter,
    check_header,
)

if TYPE_CHECKING:
    from pathlib import Path

HEADER = StreamHeader(
    qemu_version="10.0",
    mode="cpr-reboot",
    validated=frozenset({"x-ignore-shared"}),
    runstate="suspended",
    was_suspended=True,
)
SECTIONS = {
    "ram": b'[{"name":"pc.ram"}]',
    "ram/pc.ram/0000": bytes(range(256)) * 4,
    "devices/pc": b"{}",
}
HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def write_valid(path: Path) -> bytes:
    """Save a small valid state file at ``path`` and return its bytes."""
    writer = StateFileWriter(path, HEADER)
    for name, data in SECTIONS.items():
        writer.write(name, data)
    writer.commit()
    return path.read_bytes()


def load(path: Path) -> tuple[StreamHeader, dict[str, bytes]]:
    """Open ``path`` and read every section, within two seconds."""
    with within(2), StateFileReader(path) as reader:
        return reader.header, {name: reader.read(name) for name in reader.sections}


def open_crafted(tmp_path: Path, raw: bytes) -> StateFileReader:
    """Write ``raw`` and open it as a state file."""
    path = tmp_path / "crafted.state"
    path.write_bytes(raw)
    with within(2):
        return StateFileReader(path)


class TestLengths:
    """Lengths are bounded by the file's real size before anything is allocated."""

    def test_flipped_bit_31_of_the_header_length_under_1_gib(self, tmp_path: Path) -> None:
        """Under RLIMIT_AS = 1 GiB, a header length with bit 31 set is InvalidHeader at once."""
        path = tmp_path / "vm.state"
        raw = bytearray(write_valid(path))
        raw[10] ^= 0x80  # the header length's top byte
        path.write_bytes(raw)
        script = textwrap.dedent(
            f"""
            import resource, sys, time
            resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
            from cprfsm.statefile import StateFileReader
            started = time.monotonic()
            try:
                StateFileReader({str(path)!r})
            except Exception as exc:
                print(type(exc).__name__, round(time.monotonic() - started, 3))
                print(exc)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        kind, seconds = done.stdout.splitlines()[0].split()
        assert kind == "InvalidHeader"
        assert float(seconds) < 1
        assert f"more than the {MAX_HEADER_BYTES} allowed" in done.stdout

    def test_header_longer_than_the_file_is_truncation(self, tmp_path: Path) -> None:
        """A plausible header length past the end of the file is a truncated file."""
        with pytest.raises(TruncatedStateFile, match="inside the header"):
            open_crafted(tmp_path, craft(header_json(), header_length=60_000))

    def test_section_claiming_2_pow_64_bytes(self, tmp_path: Path) -> None:
        """A u64 payload length past any file is InvalidSection naming it, not OverflowError."""
        with pytest.raises(InvalidSection, match=r"'ram' .* claims 18446744073709551615 bytes"):
            open_crafted(tmp_path, craft(header_json(), [(b"ram", b"x", 2**64 - 1)]))

    def test_section_overrunning_the_file(self, tmp_path: Path) -> None:
        """A length that runs past the end of the file is a file truncated in that section."""
        with pytest.raises(TruncatedStateFile, match="inside section 'ram'"):
            open_crafted(tmp_path, craft(header_json(), [(b"ram", b"xy", 40)]))


class TestHeaderSchema:
    """Headers with valid checksums are checked field by field; each error names the field."""

    @pytest.mark.parametrize(
        ("fields", "field", "problem"),
        [
            ({"runstate": "bogus"}, "runstate", "not a known runstate"),
            ({"mode": "cpr-exec-9"}, "mode", "not a known mode"),
            ({"runstate": 7}, "runstate", "must be a name"),
            ({"mode": ["cpr-reboot"]}, "mode", "must be a name"),
            ({"was_suspended": 1}, "was_suspended", "must be true or false"),
            ({"validated": "x-ignore-shared"}, "validated", "must be a list"),
            ({"validated": [{"a": 1}]}, "validated", "must list capability names"),
            ({"validated": ["a", "a"]}, "validated", "twice"),
            ({"validated": [f"c{i}" for i in range(300)]}, "validated", "more than 256"),
            ({"qemu_version": 10.0}, "qemu_version", "must be a QEMU release"),
            ({"qemu_version": "1" * 5000}, "qemu_version", "must be a QEMU release"),
            ({"runstate": ...}, "runstate", "is missing"),
            ({"extra": 1}, "extra", "is not a header field"),
            ({"machine": None}, "machine", "must be a string"),
        ],
    )
    def test_bad_field(
        self, tmp_path: Path, fields: dict[str, object], field: str, problem: str
    ) -> None:
        """A wrong type, unknown name, missing or extra field is InvalidHeader naming it."""
        with pytest.raises(InvalidHeader, match=problem) as caught:
            open_crafted(tmp_path, craft(header_json(**fields)))
        assert caught.value.field == field

    @pytest.mark.parametrize(
        ("body", "problem"),
        [
            (b"[" * 100_000 + b"]" * 100_000, "more than the 65536 allowed"),
            (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nests deeper than 4"),
            (b"[[[[[1]]]]]", "nests deeper than 4"),
            (b"\xff\xfe", "is not JSON"),
            (b'{"a": NaN}', "is not JSON"),
            (b'{"machine": "pc", "machine": "pc"}', "is not JSON"),
            (b"1" * 5000, "is not JSON"),
            (b'"just a string"', "is a JSON str, not an object"),
            (b"[]", "is a JSON list, not an object"),
        ],
    )
    def test_bad_json(self, tmp_path: Path, body: bytes, problem: str) -> None:
        """Oversized, deep, non-UTF-8, non-finite, repeated-key or non-object JSON is refused."""
        with pytest.raises(InvalidHeader, match=problem) as caught:
            open_crafted(tmp_path, craft(body))
        assert caught.value.field is None

    def test_other_machine_keeps_qemus_text(self, tmp_path: Path) -> None:
        """A header for another machine type fails with QEMU's own message."""
        with pytest.raises(StateFileError, match="Machine type received is 'q35'"):
            open_crafted(tmp_path, craft(header_json(machine="q35")))

    def test_callers_names_decide(self, tmp_path: Path) -> None:
        """A caller's runstates and modes (a set or a predicate) replace QEMU's defaults."""
        path = tmp_path / "vm.state"
        write_valid(path)
        with pytest.raises(InvalidHeader, match="'suspended', not a known runstate"):
            StateFileReader(path, runstates={"running"})
        with pytest.raises(InvalidHeader, match="not a known mode"):
            StateFileReader(path, modes=lambda name: name == "normal")
        with StateFileReader(path, runstates=load_model("10.0").runstates) as reader:
            assert reader.header == HEADER

    def test_check_header_before_recording(self) -> None:
        """check_header validates any StreamHeader against a model's names, naming the field."""
        model = load_model("8.2")
        modes = {mode.name for mode in model.modes}
        assert check_header(HEADER, runstates=model.runstates, modes=modes) is HEADER
        later = StreamHeader(
            qemu_version="10.0",
            mode="cpr-transfer",
            validated=frozenset(),
            runstate="running",
            was_suspended=False,
        )
        with pytest.raises(InvalidHeader, match="'cpr-transfer', not a known mode") as caught:
            check_header(later, runstates=model.runstates, modes=modes)
        assert caught.value.field == "mode"

    def test_writer_refuses_a_header_it_could_not_read(self, tmp_path: Path) -> None:
        """A malformed header is refused before any file is created."""
        bad = StreamHeader(
            qemu_version="10.0",
            mode="cpr-reboot",
            validated=frozenset(),
            runstate="",
            was_suspended=False,
        )
        with pytest.raises(InvalidHeader, match="runstate"):
            StateFileWriter(tmp_path / "vm.state", bad)
        assert list(tmp_path.iterdir()) == []

    def test_default_names_are_the_models(self) -> None:
        """The default runstates and modes are exactly those of the shipped model's releases."""
        models = [load_model(version) for version in modelled_releases()]
        assert set().union(*(m.runstates for m in models)) == QEMU_RUNSTATES
        assert {mode.name for m in models for mode in m.modes} == QEMU_MODES


class TestSectionSchema:
    """Section records with valid checksums are checked: names, count, place in the file."""

    @pytest.mark.parametrize(
        ("name", "problem"),
        [
            (b"", "has a name that is empty"),
            (b"\xff\xfe", "not UTF-8"),
            (b"ram\x00x", "holds control characters"),
            (b"r" * (MAX_SECTION_NAME + 1), f"longer than {MAX_SECTION_NAME} bytes"),
        ],
    )
    def test_bad_name(self, tmp_path: Path, name: bytes, problem: str) -> None:
        """An empty, non-UTF-8, control-character or over-long name is InvalidSection."""
        with pytest.raises(InvalidSection, match=problem):
            open_crafted(tmp_path, craft(header_json(), [(name, b"x", None)]))

    def test_a_name_is_used_once(self, tmp_path: Path) -> None:
        """Two sections of one name are refused even when every checksum matches."""
        raw = craft(header_json(), [(b"ram", b"a", None), (b"ram", b"b", None)])
        with pytest.raises(StateFileError, match="appears twice"):
            open_crafted(tmp_path, raw)

    def test_writer_refuses_names_the_reader_would(self, tmp_path: Path) -> None:
        """The writer refuses an empty or control-character name instead of writing it."""
        writer = StateFileWriter(tmp_path / "vm.state", HEADER)
        for name in ("", "a\nb", "x" * (MAX_SECTION_NAME + 1)):
            with pytest.raises(StateFileError, match="section name"):
                writer.write(name, b"x")
        writer.abort()


def mutate(raw: bytes, data: st.DataObject) -> bytes:
    """Flip, overwrite, cut or insert bytes of ``raw``."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        at = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif kind == "cut":
            del out[at : at + data.draw(st.integers(1, 64))]
        else:
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
NAMES = st.sampled_from([*sorted(QEMU_RUNSTATES), "", "x" * 70, "Running", "no such"])


@st.composite
def crafted_headers(draw: st.DrawFn) -> bytes:
    """A header JSON with fields dropped, added or replaced by random JSON or near-names."""
    fields: dict[str, object] = json.loads(header_json())
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from([*fields, "extra"]))
        action = draw(st.sampled_from(["drop", "json", "name"]))
        if action == "drop":
            fields.pop(field, None)
        else:
            fields[field] = draw(JSON if action == "json" else NAMES)
    return json.dumps(fields).encode()


class TestProperties:
    """Whatever is done to a state file, opening it is a typed error or the same result."""

    @HYPOTHESIS
    @given(data=st.data())
    def test_damaged_files(self, tmp_path: Path, data: st.DataObject) -> None:
        """Byte flips, overwrites, cuts and insertions: CprFsmError or identical contents."""
        path = tmp_path / "vm.state"
        raw = write_valid(path)
        original = load(path)
        path.write_bytes(mutate(raw, data))
        try:
            result = load(path)
        except CprFsmError:
            return
        assert result == original

    @HYPOTHESIS
    @given(
        header=crafted_headers()
        | st.binary(max_size=64)
        | JSON.map(lambda v: json.dumps(v).encode())
    )
    def test_crafted_headers(self, tmp_path: Path, header: bytes) -> None:
        """Crafted headers with valid checksums: CprFsmError or a header that fits the schema."""
        path = tmp_path / "crafted.state"
        path.write_bytes(craft(header, [(b"devices/pc", b"{}", None)]))
        try:
            got, sections = load(path)
        except CprFsmError:
            return
        assert check_header(got) == got
        assert sections == {"devices/pc": b"{}"}
        assert json.loads(header)["runstate"] == got.runstate

    @HYPOTHESIS
    @given(
        sections=st.lists(
            st.tuples(
                st.binary(max_size=12) | st.sampled_from([b"ram", b"devices/pc"]),
                st.binary(max_size=32),
                st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 64),
            ),
            max_size=5,
        ),
        count=st.none() | st.integers(0, 2**32 - 1),
    )
    def test_crafted_directories(
        self,
        tmp_path: Path,
        sections: list[tuple[bytes, bytes, int | None]],
        count: int | None,
    ) -> None:
        """Crafted names, lengths and counts with valid checksums: CprFsmError or the truth."""
        path = tmp_path / "crafted.state"
        path.write_bytes(craft(header_json(), sections, count=count))
        try:
            _, got = load(path)
        except CprFsmError:
            return
        assert got == {name.decode(): payload for name, payload, _ in sections}


def test_a_large_valid_file_opens_quickly(tmp_path: Path) -> None:
    """Bounds cost nothing on a real file: 2,000 sections open in well under a second."""
    path = tmp_path / "vm.state"
    writer = StateFileWriter(path, HEADER)
    for index in range(2000):
        writer.write(f"ram/pc.ram/{index:04d}", b"x" * 64)
    writer.commit()
    started = time.monotonic()
    with StateFileReader(path) as reader:
        assert len(reader.sections) == 2000
    assert time.monotonic() - started < 1
