"""The state-file format: round trips, atomic commits, and typed errors for damaged files."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import subprocess
import zlib
from typing import TYPE_CHECKING

import pytest

from cprfsm import statefile
from cprfsm.exceptions import (
    CorruptSection,
    CorruptStateFile,
    ForeignStateFile,
    MissingSection,
    PortError,
    StateFileError,
    TruncatedStateFile,
    UnsupportedStateFile,
)
from cprfsm.ports import StreamHeader
from cprfsm.statefile import MAGIC, StateFileReader, StateFileWriter

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

HEADER = StreamHeader(
    qemu_version="10.0",
    mode="cpr-reboot",
    validated=frozenset({"x-ignore-shared"}),
    runstate="suspended",
    was_suspended=True,
)
SECTION = 2 * 2**20  # above the size whose checksum runs alongside the write
SMALL_FS = 4 * 2**20


def payloads() -> dict[str, bytes]:
    """Four RAM-like sections and a device section, each distinct."""
    ram = {f"ram/pc.ram/{i:04d}": bytes([i + 1]) * SECTION for i in range(4)}
    return ram | {"devices/pc": b'{"counter":3}'}


def write(path: Path, sections: dict[str, bytes]) -> None:
    """Save ``sections`` to ``path``."""
    writer = StateFileWriter(path, HEADER)
    for name, data in sections.items():
        writer.write(name, data)
    writer.commit()


def payload_offset(raw: bytes, section: str) -> int:
    """Where a section's payload starts: after 'S', u16, name, u64 length, u32 checksum."""
    name = section.encode()
    return raw.index(b"S" + len(name).to_bytes(2, "big") + name) + 3 + len(name) + 12


def flip(path: Path, offset: int) -> None:
    """Invert one byte of the file."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(raw)


def leftovers(folder: Path) -> list[str]:
    """Temporary files a writer left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


def mount_tmpfs(folder: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes on ``folder``; False where this user cannot."""
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    return mount.returncode == 0


@contextlib.contextmanager
def small_filesystem(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make ``folder`` hold 4 MiB: a tmpfs if it can be mounted, else writes fail past that."""
    folder.mkdir()
    mounted = mount_tmpfs(folder, SMALL_FS)
    if not mounted:
        real = statefile._write_all

        def limited(fd: int, data: bytes) -> int:
            used = sum(p.stat().st_size for p in folder.iterdir())
            if used + memoryview(data).nbytes > SMALL_FS:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        monkeypatch.setattr(statefile, "_write_all", limited)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder that holds 4 MiB."""
    with small_filesystem(tmp_path / "small", monkeypatch) as folder:
        yield folder


class TestRoundTrip:
    """What is written is read back, and a file appears only on commit."""

    def test_header_and_sections_come_back(self, tmp_path: Path) -> None:
        """The header, section names (in order) and payloads survive a round trip."""
        path = tmp_path / "vm.state"
        sections = payloads()
        writer = StateFileWriter(path, HEADER)
        for name, data in sections.items():
            writer.write(name, memoryview(data))
        transfer = writer.commit()
        assert transfer.bytes == path.stat().st_size
        with StateFileReader(path) as reader:
            assert reader.header == HEADER
            assert reader.sections == tuple(sections)
            assert {name: reader.read(name) for name in reader.sections} == sections
            reader.verify()

    def test_checksums_are_the_payloads_crc32(self, tmp_path: Path) -> None:
        """Writer and reader report each section's CRC-32, computed once while writing."""
        path = tmp_path / "vm.state"
        writer = StateFileWriter(path, HEADER)
        writer.write("big", b"x" * SECTION)
        writer.write("small", b"y")
        assert writer.checksum("big") == zlib.crc32(b"x" * SECTION)
        writer.commit()
        with StateFileReader(path) as reader:
            assert reader.checksum("small") == zlib.crc32(b"y")

    def test_commit_replaces_the_old_file_atomically(self, tmp_path: Path) -> None:
        """Until commit the old file is untouched; after it, the new one is whole."""
        path = tmp_path / "vm.state"
        write(path, {"old": b"old"})
        old = path.read_bytes()
        writer = StateFileWriter(path, HEADER)
        writer.write("new", b"new" * 1000)
        assert path.read_bytes() == old
        writer.commit()
        with StateFileReader(path) as reader:
            assert reader.sections == ("new",)
        assert leftovers(tmp_path) == []

    def test_abort_keeps_the_old_file(self, tmp_path: Path) -> None:
        """An aborted save leaves the previous file and no temporary file."""
        path = tmp_path / "vm.state"
        write(path, {"old": b"old"})
        old = path.read_bytes()
        writer = StateFileWriter(path, HEADER)
        writer.write("new", b"new")
        writer.abort()
        assert path.read_bytes() == old
        assert leftovers(tmp_path) == []

    def test_dropped_writer_leaves_nothing(self, tmp_path: Path) -> None:
        """A writer dropped without commit or abort removes its temporary file."""
        writer = StateFileWriter(tmp_path / "vm.state", HEADER)
        writer.write("ram", b"x")
        del writer
        gc.collect()
        assert list(tmp_path.iterdir()) == []

    def test_a_section_name_is_written_once(self, tmp_path: Path) -> None:
        """Writing the same section twice is refused."""
        writer = StateFileWriter(tmp_path / "vm.state", HEADER)
        writer.write("ram", b"x")
        with pytest.raises(StateFileError, match="written twice"):
            writer.write("ram", b"y")
        writer.abort()

    def test_a_closed_reader_reads_nothing(self, tmp_path: Path) -> None:
        """After close, reading is refused instead of reading whatever reuses the descriptor."""
        path = tmp_path / "vm.state"
        write(path, {"devices/pc": b"state"})
        reader = StateFileReader(path)
        reader.close()
        with pytest.raises(StateFileError, match="was closed"):
            reader.read("devices/pc")

    def test_a_committed_writer_is_closed(self, tmp_path: Path) -> None:
        """Writing after commit is refused."""
        writer = StateFileWriter(tmp_path / "vm.state", HEADER)
        writer.commit()
        with pytest.raises(StateFileError, match="already closed"):
            writer.write("late", b"x")


class TestDamage:
    """A damaged file is refused with a typed error that names the file (and the section)."""

    def test_flipped_payload_byte_names_its_section(self, tmp_path: Path) -> None:
        """Reading the damaged section fails naming it; the other sections still read."""
        path = tmp_path / "vm.state"
        write(path, payloads())
        flip(path, payload_offset(path.read_bytes(), "ram/pc.ram/0003") + 12345)
        with StateFileReader(path) as reader:
            assert reader.read("ram/pc.ram/0002") == bytes([3]) * SECTION
            with pytest.raises(CorruptSection) as caught:
                reader.read("ram/pc.ram/0003")
            with pytest.raises(CorruptSection):
                reader.verify()
        assert caught.value.section == "ram/pc.ram/0003"
        assert (
            str(caught.value)
            == f"section 'ram/pc.ram/0003' of {path} is corrupt: checksum mismatch"
        )

    @pytest.mark.parametrize(
        ("where", "message"),
        [
            (len(MAGIC) + 8, "the header does not match its checksum"),
            (-1, "digest does not match"),
            (-18, "the end marker counts 65281 sections, the file holds 1"),
        ],
        ids=["header", "digest", "section-count"],
    )
    def test_damage_outside_payloads_is_found_on_open(
        self, tmp_path: Path, where: int, message: str
    ) -> None:
        """The header checksum and the end marker's digest cover everything but payloads."""
        path = tmp_path / "vm.state"
        write(path, {"devices/pc": b"state"})
        flip(path, where % path.stat().st_size)
        with pytest.raises(CorruptStateFile, match=message):
            StateFileReader(path)

    def test_damaged_section_record_is_found_on_open(self, tmp_path: Path) -> None:
        """A flipped byte in a section's name fails its record checksum."""
        path = tmp_path / "vm.state"
        write(path, {"devices/pc": b"state"})
        flip(path, path.read_bytes().index(b"devices/pc") + 2)
        with pytest.raises(CorruptStateFile, match="section record at byte"):
            StateFileReader(path)

    def test_damaged_payload_checksum_breaks_the_digest(self, tmp_path: Path) -> None:
        """A flipped byte in a payload's CRC-32 is caught by the end marker's digest."""
        path = tmp_path / "vm.state"
        write(path, {"devices/pc": b"state"})
        flip(path, payload_offset(path.read_bytes(), "devices/pc") + len(b"state"))
        with pytest.raises(CorruptStateFile, match="digest does not match"):
            StateFileReader(path)

    @pytest.mark.parametrize("keep", [0, 3, len(MAGIC) + 4, 40, -SECTION, -25, -1])
    def test_truncated_file(self, tmp_path: Path, keep: int) -> None:
        """A file cut anywhere is reported as truncated, with the byte it ends at."""
        path = tmp_path / "vm.state"
        write(path, payloads())
        raw = path.read_bytes()
        cut = raw[: keep % len(raw)] if keep else b""
        path.write_bytes(cut)
        with pytest.raises(TruncatedStateFile, match=f"{path} is truncated: it ends at byte"):
            StateFileReader(path)

    def test_bytes_after_the_end_marker(self, tmp_path: Path) -> None:
        """Anything after the end marker is damage, not ignored."""
        path = tmp_path / "vm.state"
        write(path, {"devices/pc": b"state"})
        path.write_bytes(path.read_bytes() + b"junk")
        with pytest.raises(CorruptStateFile, match="4 bytes follow the end marker"):
            StateFileReader(path)

    def test_random_bytes_are_foreign(self, tmp_path: Path) -> None:
        """A file that is not a state file says so."""
        path = tmp_path / "vm.state"
        path.write_bytes(bytes(range(256)) * 4)
        with pytest.raises(ForeignStateFile, match="is not a cprfsm state file"):
            StateFileReader(path)

    def test_qemu_stream_is_recognised(self, tmp_path: Path) -> None:
        """A QEMU migration stream (magic QEVM, version 3) is named as such."""
        path = tmp_path / "vm.state"
        path.write_bytes(b"QEVM\x00\x00\x00\x03" + b"\x07" + bytes(64))
        with pytest.raises(ForeignStateFile, match="a QEMU migration stream"):
            StateFileReader(path)

    def test_newer_format_version(self, tmp_path: Path) -> None:
        """A format version this module does not know is refused with both versions."""
        path = tmp_path / "vm.state"
        write(path, {})
        raw = bytearray(path.read_bytes())
        raw[len(MAGIC) : len(MAGIC) + 2] = (2).to_bytes(2, "big")
        path.write_bytes(raw)
        with pytest.raises(
            UnsupportedStateFile, match="format version 2; this cprfsm reads version 1"
        ):
            StateFileReader(path)

    def test_missing_section(self, tmp_path: Path) -> None:
        """Asking for a section the file does not hold names both."""
        path = tmp_path / "vm.state"
        write(path, {})
        with (
            StateFileReader(path) as reader,
            pytest.raises(MissingSection, match=f"section 'devices/pc' is missing from {path}"),
        ):
            reader.read("devices/pc")

    def test_errors_are_port_errors(self) -> None:
        """The machine records every state-file error as a failed operation."""
        for error in (ForeignStateFile, TruncatedStateFile, CorruptSection, MissingSection):
            assert issubclass(error, StateFileError)
        assert issubclass(StateFileError, PortError)


class TestInputOutput:
    """I/O failures carry QEMU's text and never damage an existing file."""

    def test_missing_file(self, tmp_path: Path) -> None:
        """Opening a file that is not there: QEMU's ``Could not open``."""
        path = tmp_path / "vm.state"
        with pytest.raises(PortError) as caught:
            StateFileReader(path)
        assert caught.value.error == f"Could not open '{path}': No such file or directory"

    @pytest.mark.parametrize(
        ("target", "reason"),
        [
            ("a-file/vm.state", "Not a directory"),
            ("no-such-dir/vm.state", "No such file or directory"),
            (".", "Is a directory"),
        ],
    )
    def test_unwritable_path(self, tmp_path: Path, target: str, reason: str) -> None:
        """Creating a file where none can be: QEMU's ``Could not create``."""
        (tmp_path / "a-file").write_bytes(b"")
        path = tmp_path / target
        with pytest.raises(PortError) as caught:
            StateFileWriter(path, HEADER)
        assert caught.value.error == f"Could not create '{path}': {reason}"

    def test_disk_full_keeps_the_old_file(self, small_fs: Path) -> None:
        """ENOSPC fails the save with QEMU's text; the old file survives, the space is freed."""
        path = small_fs / "vm.state"
        write(path, {"old": b"old"})
        old = path.read_bytes()
        writer = StateFileWriter(path, HEADER)
        with pytest.raises(PortError) as caught:
            writer.write("ram", bytes(2 * SMALL_FS))
        writer.abort()
        assert caught.value.error == "Unable to write to file: No space left on device"
        assert path.read_bytes() == old
        assert leftovers(small_fs) == []
        write(small_fs / "again.state", {"fits": b"x" * 2**20})
