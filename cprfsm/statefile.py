"""The state-file format the simulator writes to ``file:`` URIs.

A state file holds what a cpr-reboot ``migrate`` saves: the stream header,
then named sections (guest RAM in chunks, one per device), then an end marker.
It is written to a temporary file in the target's directory (mode 0600: it
holds guest memory), fsynced and renamed into place on commit (the directory
is fsynced too), so a failed save never leaves a partial file at the URI and
an older file there survives it.

Layout (integers big-endian)::

    preamble   MAGIC (8 bytes: 89 'CPR' 0d 0a 1a 0a)
               version                 u16   (VERSION)
               header length           u32
               header                  JSON, UTF-8: qemu_version, machine ('pc'),
                                       mode, validated, runstate, was_suspended
               header checksum         u32   CRC-32 of the JSON bytes
    section    'S'                     1 byte
    (repeated) name length             u16
               name                    UTF-8, unique in the file
               payload length          u64
               record checksum         u32   CRC-32 of the record from 'S' to here
               payload
               payload checksum        u32   CRC-32 of the payload
    end        'E'                     1 byte
               section count           u32
               digest                  16 bytes

The digest is BLAKE2b-128 over every byte of the file before it except the
payloads, which enter through their CRC-32: it binds the header, the order,
names, lengths and contents of the sections without hashing the RAM twice.
CRC-32 runs at memory speed (~7 GB/s here, against ~1.4 GB/s for BLAKE2b), and
the writer computes it on a second thread while the payload is written, which
is why it follows the payload; it catches any burst of up to 32 flipped bits
and guards against damage, not against forgery.

The reader indexes the sections when it opens a file (it reads the records,
not the payloads) and checks the preamble, the header, every record and the
end marker then; each payload is checked when it is read.  Damage raises a
:class:`StateFileError` subclass naming the file, and the section for a
damaged payload.

A state file is untrusted input: a length is compared with the file's real
size before anything is read or allocated for it, the header is at most
:data:`MAX_HEADER_BYTES` of JSON nested at most :data:`MAX_HEADER_DEPTH` deep,
and the header and section directory are checked against an explicit schema
(:func:`check_header`; names, types, the runstate and mode known) whether or
not the checksums match, so a crafted file fails with
:class:`InvalidHeader` or :class:`InvalidSection` naming the field or
section, before a caller sees any of it.  I/O failures raise :class:`~cprfsm.ports.PortError` with
QEMU's text (``Could not create '…': …``, ``Unable to write to file: …``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import weakref
import zlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeAlias

import attrs

from cprfsm._files import not_regular
from cprfsm.exceptions import (
    CorruptSection,
    CorruptStateFile,
    ForeignStateFile,
    InvalidHeader,
    InvalidSection,
    MissingSection,
    PortError,
    StateFileError,
    TruncatedStateFile,
    UnsupportedStateFile,
)
from cprfsm.ports import StreamHeader, Transfer

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "MACHINE",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "MAX_SECTIONS",
    "MAX_SECTION_NAME",
    "QEMU_MODES",
    "QEMU_RUNSTATES",
    "VERSION",
    "NameCheck",
    "StateFileReader",
    "StateFileWriter",
    "check_header",
]

MAGIC = b"\x89CPR\r\n\x1a\n"
"""The first bytes of every state file (PNG-style: text-mode transfers mangle them)."""

VERSION = 1
"""The format version this module writes and reads."""

MACHINE = "pc"
"""The QEMU machine type the state files describe."""

MAX_HEADER_BYTES = 64 * 2**10
"""The largest header read (a real one is about 150 bytes; 64 KiB holds any capability list)."""

MAX_HEADER_DEPTH = 4
"""The deepest JSON nesting of a header (a real one nests 2: an object holding a list)."""

MAX_SECTION_NAME = 1024
"""The longest section name in bytes (a real one is ``devices/<node>`` or ``ram/<block>/<n>``)."""

MAX_SECTIONS = 2**18
"""The most sections a file may hold: 2 TiB of RAM in the simulator's 8 MiB sections."""

QEMU_RUNSTATES = frozenset(
    {
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    }
)
"""QEMU's RunState names (qapi/run-state.json): what a header's runstate may be by default."""

QEMU_MODES = frozenset({"normal", "cpr-reboot", "cpr-transfer"})
"""QEMU's MigMode names (qapi/migration.json) in the modelled releases."""

NameCheck: TypeAlias = Callable[[str], bool] | Collection[str]
"""The valid names of a header field: a collection of them, or a predicate."""

_PREAMBLE = struct.Struct(">HI")
_CRC = struct.Struct(">I")
_NAME_LENGTH = struct.Struct(">H")
_LENGTH = struct.Struct(">Q")
_COUNT = struct.Struct(">I")
_DIGEST_SIZE = 16
_SECTION = b"S"
_END = b"E"
# Below this a payload is checksummed inline; above, on a thread while it is written.
_CONCURRENT_CHECKSUM = 1 << 20


class _Pending:
    """The temporary file of an uncommitted writer; discarding it is safe to repeat."""

    def __init__(self, fd: int, tmp: str) -> None:
        self.fd: int | None = fd
        self.tmp: str | None = tmp

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        try:
            self.close()
        finally:
            if self.tmp is not None:
                tmp, self.tmp = self.tmp, None
                Path(tmp).unlink(missing_ok=True)


class StateFileWriter:
    """A state file being written (a :class:`~cprfsm.ports.StreamWriter`).

    ``write`` takes any contiguous buffer (bytes, or a memoryview of guest RAM,
    written without a copy).  Dropping the writer without :meth:`commit`
    discards its temporary file, like :meth:`abort`.
    """

    def __init__(self, path: str | os.PathLike[str], header: StreamHeader) -> None:
        """Start a state file for ``path`` (QEMU's ``Could not create '…': …`` on failure)."""
        self._path = os.fspath(path)
        check_header(header, runstates=None, modes=None, path=self._path)
        target = Path(self._path)
        if target.is_dir():
            raise PortError(f"Could not create '{self._path}': {os.strerror(errno.EISDIR)}")
        try:
            kind = not_regular(os.lstat(target).st_mode)
        except OSError:
            kind = None  # missing (the usual case), or mkstemp below says why not
        if kind is not None:
            # The rename on commit would replace it: a symlink, device node or FIFO is left alone.
            raise PortError(
                f"Could not create '{self._path}': it is {kind}, not a regular file; "
                "give the path of a regular file or of a new one"
            )
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".partial", dir=target.parent
            )
        except OSError as exc:
            raise PortError(f"Could not create '{self._path}': {exc.strerror}") from exc
        self._pending = _Pending(fd, tmp)
        self._discard = weakref.finalize(self, self._pending.discard)
        self._digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        self._checksums: dict[str, int] = {}
        self._size = 0
        self._emit(_preamble(header), digest=True)

    @property
    def path(self) -> str:
        """Where the file appears on commit."""
        return self._path

    def write(self, section: str, data: Buffer) -> None:
        """Append one named section (StateFileError if the name is already used)."""
        if section in self._checksums:
            raise StateFileError(self._path, f"section {section!r} written twice to {self._path}")
        problem = _name_problem(section)
        if problem is not None:
            raise StateFileError(self._path, f"section name '{_quote(section)}' {problem}")
        if len(self._checksums) >= MAX_SECTIONS:
            raise StateFileError(self._path, f"a state file holds at most {MAX_SECTIONS} sections")
        name = section.encode()
        with memoryview(data) as view:
            head = _SECTION + _NAME_LENGTH.pack(len(name)) + name + _LENGTH.pack(view.nbytes)
            self._emit(head + _CRC.pack(zlib.crc32(head)), digest=True)
            crc = self._payload(view)
        self._emit(_CRC.pack(crc), digest=True)
        self._checksums[section] = crc

    def checksum(self, section: str) -> int:
        """The CRC-32 of a section written (so a caller need not compute it again)."""
        return self._checksums[section]

    def commit(self) -> Transfer:
        """Write the end marker, fsync, rename into place, fsync the directory."""
        end = _END + _COUNT.pack(len(self._checksums))
        self._digest.update(end)
        digest = self._digest.digest()
        self._emit(end + digest, digest=False)
        fd = self._fd()
        try:
            os.fsync(fd)
            self._pending.close()
        except OSError as exc:
            self._discard()
            raise PortError(f"Unable to write to file: {exc.strerror}") from exc
        tmp, self._pending.tmp = self._pending.tmp, None
        assert tmp is not None  # _fd() proved the writer open
        try:
            Path(tmp).replace(self._path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise PortError(f"Could not create '{self._path}': {exc.strerror}") from exc
        try:
            _fsync_directory(Path(self._path).parent)
        except OSError as exc:
            raise PortError(
                f"Unable to sync the directory of '{self._path}': {exc.strerror}"
            ) from exc
        return Transfer(bytes=self._size, digest=digest.hex())

    def abort(self) -> None:
        """Discard the temporary file; the file at ``path`` (if any) is untouched."""
        self._discard()

    def _fd(self) -> int:
        fd = self._pending.fd
        if fd is None:
            raise StateFileError(self._path, f"the stream to {self._path} is already closed")
        return fd

    def _emit(self, data: Buffer, *, digest: bool) -> None:
        fd = self._fd()
        try:
            self._size += _write_all(fd, data)
        except OSError as exc:
            # Free the space at once: the machine aborts the stream after the failure anyway.
            self._discard()
            raise PortError(f"Unable to write to file: {exc.strerror}") from exc
        if digest:
            self._digest.update(data)

    def _payload(self, view: memoryview) -> int:
        """Write a payload and return its CRC-32, computed alongside the write."""
        if view.nbytes < _CONCURRENT_CHECKSUM:
            self._emit(view, digest=False)
            return zlib.crc32(view)
        crc: list[int] = []
        # A thread per payload: ~0.1 ms against ~4 ms of I/O for 8 MiB, and nothing to
        # shut down or to break in a forked child.  zlib releases the GIL for large buffers.
        worker = threading.Thread(target=lambda: crc.append(zlib.crc32(view)))
        worker.start()
        try:
            self._emit(view, digest=False)
        finally:
            worker.join()  # it reads the view: wait even when the write failed
        return crc[0]


@attrs.frozen(kw_only=True)
class _Section:
    offset: int
    length: int
    crc: int


class StateFileReader:
    """A state file opened for loading (a :class:`~cprfsm.ports.StreamReader`).

    Opening it checks everything but the payloads; :meth:`read` checks each
    payload it returns.  Close it, or use it as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        runstates: NameCheck = QEMU_RUNSTATES,
        modes: NameCheck = QEMU_MODES,
    ) -> None:
        """Open, index and check ``path``; ``runstates`` and ``modes`` are the valid names.

        QEMU's ``Could not open '…': …`` if it cannot be opened; a StateFileError
        subclass if it is damaged or its header breaks the schema.
        """
        self._path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it).
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise PortError(f"Could not open '{self._path}': {exc.strerror}") from exc
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is not None:
            os.close(fd)
            problem = os.strerror(errno.EISDIR) if kind == "a directory" else f"it is {kind}"
            raise PortError(f"Could not open '{self._path}': {problem}, not a state file")
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        try:
            self._header, self._index = _Scan(fd, self._path).run()
            check_header(self._header, runstates=runstates, modes=modes, path=self._path)
        except BaseException:
            self._close()
            raise

    def __enter__(self) -> Self:
        """Use the reader in a with block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the file."""
        self.close()

    @property
    def path(self) -> str:
        """The file read."""
        return self._path

    @property
    def header(self) -> StreamHeader:
        """The stream's configuration and global state, already checked by :func:`check_header`."""
        return self._header

    @property
    def sections(self) -> tuple[str, ...]:
        """The section names, in file order."""
        return tuple(self._index)

    def read(self, section: str) -> bytes:
        """One section's payload, checked against its checksum."""
        entry = self._index.get(section)
        if entry is None:
            raise MissingSection(self._path, section)
        if not self._close.alive:  # the descriptor number may belong to another file now
            raise StateFileError(self._path, f"{self._path} was closed")
        data = _read_at(self._fd, entry.offset, entry.length)
        if len(data) < entry.length:
            where = f"inside section {section!r}"
            raise TruncatedStateFile(self._path, entry.offset + len(data), where)
        if zlib.crc32(data) != entry.crc:
            raise CorruptSection(self._path, section)
        return data

    def checksum(self, section: str) -> int:
        """The CRC-32 recorded for a section (:meth:`read` checks the payload against it)."""
        entry = self._index.get(section)
        if entry is None:
            raise MissingSection(self._path, section)
        return entry.crc

    def verify(self) -> None:
        """Check every section's payload (what loading would find, without loading)."""
        for section in self._index:
            self.read(section)

    def close(self) -> None:
        """Close the file; closing again does nothing."""
        self._close()


class _Scan:
    """One pass over the records of a state file: header and section index.

    Every length is compared with the file's size before it is read, so a
    damaged or crafted length costs nothing; names and the directory are
    checked against the schema whatever the checksums say.
    """

    # The smallest file that can follow a position: the end marker.
    _END_SIZE = 1 + _COUNT.size + _DIGEST_SIZE

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._size = os.fstat(fd).st_size
        self._digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        self._consumed = 0

    def run(self) -> tuple[StreamHeader, dict[str, _Section]]:
        header = self._preamble()
        index: dict[str, _Section] = {}
        pos = first = self._consumed
        while True:
            tag = self._take(pos, 1, "before the end marker")
            if tag == _END:
                self._end(pos, len(index))
                _check_directory(self._path, index, first, pos)
                return header, index
            if tag != _SECTION:
                raise CorruptStateFile(self._path, f"unexpected byte {tag!r} at byte {pos}")
            if len(index) >= MAX_SECTIONS:
                raise InvalidSection(
                    self._path, None, pos, f"is past the limit of {MAX_SECTIONS} sections"
                )
            name, entry = self._record(pos)
            if name in index:
                raise CorruptStateFile(self._path, f"section {name!r} appears twice")
            index[name] = entry
            pos = self._consumed

    def _preamble(self) -> StreamHeader:
        start = self._read(0, len(MAGIC) + _PREAMBLE.size)
        if not start.startswith(MAGIC) and not MAGIC.startswith(start):
            raise ForeignStateFile(self._path, start)
        if len(start) < len(MAGIC) + _PREAMBLE.size:
            raise TruncatedStateFile(self._path, len(start), "inside the preamble")
        version, length = _PREAMBLE.unpack_from(start, len(MAGIC))
        if version != VERSION:
            raise UnsupportedStateFile(self._path, version, reads=VERSION)
        if length > MAX_HEADER_BYTES:
            raise InvalidHeader(
                self._path,
                None,
                f"claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed",
            )
        raw = self._take(len(start), length + _CRC.size, "inside the header")
        body, (crc,) = raw[:length], _CRC.unpack_from(raw, length)
        if zlib.crc32(body) != crc:
            raise CorruptStateFile(self._path, "the header does not match its checksum")
        self._digest.update(start + raw)
        self._consumed = len(start) + len(raw)
        return _decode_header(body, self._path)

    def _record(self, pos: int) -> tuple[str, _Section]:
        (length,) = _NAME_LENGTH.unpack(self._take(pos + 1, _NAME_LENGTH.size, "in a record"))
        start = pos + 1 + _NAME_LENGTH.size
        rest = self._take(start, length + _LENGTH.size + _CRC.size, "in a record")
        (size,) = _LENGTH.unpack_from(rest, length)
        (record_crc,) = _CRC.unpack_from(rest, length + _LENGTH.size)
        record = _SECTION + _NAME_LENGTH.pack(length) + rest
        if zlib.crc32(record[: -_CRC.size]) != record_crc:
            raise CorruptStateFile(self._path, f"the section record at byte {pos} is damaged")
        try:
            name = rest[:length].decode()
        except UnicodeDecodeError:
            raise InvalidSection(self._path, None, pos, "has a name that is not UTF-8") from None
        problem = _name_problem(name)
        if problem is not None:
            raise InvalidSection(self._path, None, pos, f"has a name that {problem}")
        offset = pos + len(record)
        if size > self._size:
            raise InvalidSection(
                self._path, name, pos, f"claims {size} bytes, more than the whole file holds"
            )
        trailer = self._take(offset + size, _CRC.size, f"inside section {name!r}")
        self._digest.update(record + trailer)
        self._consumed = offset + size + _CRC.size
        return name, _Section(offset=offset, length=size, crc=_CRC.unpack(trailer)[0])

    def _end(self, pos: int, count: int) -> None:
        raw = self._take(pos + 1, _COUNT.size + _DIGEST_SIZE, "inside the end marker")
        (written,) = _COUNT.unpack_from(raw)
        self._digest.update(_END + raw[: _COUNT.size])
        if written != count:
            raise CorruptStateFile(
                self._path, f"the end marker counts {written} sections, the file holds {count}"
            )
        if raw[_COUNT.size :] != self._digest.digest():
            raise CorruptStateFile(self._path, "the end marker's digest does not match")
        end = pos + 1 + len(raw)
        if end != self._size:
            raise CorruptStateFile(
                self._path, f"{self._size - end} bytes follow the end marker at byte {pos}"
            )

    def _take(self, offset: int, length: int, where: str) -> bytes:
        """Exactly ``length`` bytes at ``offset``; nothing is read past the file's size."""
        if offset + length > self._size:
            raise TruncatedStateFile(self._path, self._size, where)
        data = self._read(offset, length)
        if len(data) < length:  # the file shrank since it was opened
            raise TruncatedStateFile(self._path, offset + len(data), where)
        return data

    def _read(self, offset: int, length: int) -> bytes:
        return _read_at(self._fd, offset, min(length, max(self._size - offset, 0)))


def _check_directory(path: str, index: dict[str, _Section], start: int, end: int) -> None:
    """The sections lie in file order between the header and the end marker, apart."""
    low = start
    for name, entry in index.items():
        stop = entry.offset + entry.length + _CRC.size
        if entry.offset < low or stop > end or entry.length < 0:
            raise InvalidSection(
                path, name, entry.offset, "overlaps another section or lies outside the file"
            )
        low = stop


def _preamble(header: StreamHeader) -> bytes:
    body = json.dumps(
        {
            "qemu_version": header.qemu_version,
            "machine": MACHINE,
            "mode": header.mode,
            "validated": sorted(header.validated),
            "runstate": header.runstate,
            "was_suspended": header.was_suspended,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return MAGIC + _PREAMBLE.pack(VERSION, len(body)) + body + _CRC.pack(zlib.crc32(body))


_HEADER_FIELDS = ("qemu_version", "machine", "mode", "validated", "runstate", "was_suspended")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,63}", re.ASCII)
_HEADER_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.+-]{0,31}", re.ASCII)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_MAX_VALIDATED = 256


def _decode_header(body: bytes, path: str) -> StreamHeader:
    """The header's JSON as a StreamHeader, every field checked for shape."""
    _check_depth(body, path)
    try:
        fields = json.loads(
            body.decode(), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:
        raise InvalidHeader(path, None, f"is not JSON ({_first_line(exc)})") from None
    if not isinstance(fields, dict):
        raise InvalidHeader(path, None, f"is a JSON {type(fields).__name__}, not an object")
    for field in fields:
        if field not in _HEADER_FIELDS:
            raise InvalidHeader(path, _quote(field), "is not a header field")
    for field in _HEADER_FIELDS:
        if field not in fields:
            raise InvalidHeader(path, field, "is missing")
    machine = fields["machine"]
    if not isinstance(machine, str):
        raise InvalidHeader(path, "machine", "must be a string")
    if machine != MACHINE:
        # QEMU's configuration-section check (migration/savevm.c).
        raise StateFileError(
            path, f"Machine type received is '{_quote(machine)}' and local is '{MACHINE}'"
        )
    validated = fields["validated"]
    _check_validated(validated, path)
    if len(set(validated)) != len(validated):
        raise InvalidHeader(path, "validated", "names a capability twice")
    header = StreamHeader(
        qemu_version=fields["qemu_version"],
        mode=fields["mode"],
        validated=frozenset(validated),
        runstate=fields["runstate"],
        was_suspended=fields["was_suspended"],
    )
    _check_shape(header, path)
    return header


def check_header(
    header: StreamHeader,
    *,
    runstates: NameCheck | None = QEMU_RUNSTATES,
    modes: NameCheck | None = QEMU_MODES,
    path: str = "the stream",
) -> StreamHeader:
    """Return ``header`` if it fits the schema, else raise InvalidHeader naming the field.

    Every field must have its type and a name's spelling; ``runstate`` must be
    one of ``runstates`` and ``mode`` one of ``modes`` (a collection of names
    or a predicate; None accepts any well-spelled name).  The reader calls it
    before returning a header, so a caller can pass its model's names and
    check a header before it records anything.
    """
    _check_shape(header, path)
    for field, value, valid in (
        ("runstate", header.runstate, runstates),
        ("mode", header.mode, modes),
    ):
        if valid is not None and not (valid(value) if callable(valid) else value in valid):
            raise InvalidHeader(path, field, f"is '{_quote(value)}', not a known {field}")
    return header


def _check_shape(header: StreamHeader, path: str) -> None:
    """The types and spellings of the header's fields."""
    version: object = header.qemu_version
    if not isinstance(version, str) or not _HEADER_VERSION.fullmatch(version):
        raise InvalidHeader(path, "qemu_version", 'must be a QEMU release such as "10.0"')
    for field in ("mode", "runstate"):
        value: object = getattr(header, field)
        if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
            raise InvalidHeader(path, field, "must be a name of at most 64 lowercase characters")
    _check_validated(header.validated, path)
    suspended: object = header.was_suspended
    if not isinstance(suspended, bool):
        raise InvalidHeader(path, "was_suspended", "must be true or false")


def _check_depth(body: bytes, path: str) -> None:
    """The JSON in ``body`` nests at most MAX_HEADER_DEPTH deep (before json parses it)."""
    depth = 0
    for byte in _JSON_STRING.sub(b'""', body):
        if byte in b"[{":
            depth += 1
            if depth > MAX_HEADER_DEPTH:
                raise InvalidHeader(path, None, f"nests deeper than {MAX_HEADER_DEPTH} levels")
        elif byte in b"]}":
            depth -= 1


def _check_validated(validated: object, path: str) -> None:
    """``validated`` is a list or set of at most _MAX_VALIDATED capability names."""
    if not isinstance(validated, frozenset | set | list | tuple):
        raise InvalidHeader(path, "validated", "must be a list of capability names")
    if len(validated) > _MAX_VALIDATED:
        raise InvalidHeader(path, "validated", f"lists more than {_MAX_VALIDATED} capabilities")
    for name in validated:
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidHeader(path, "validated", "must list capability names")


def _name_problem(name: str) -> str | None:
    """What is wrong with a section name, or None."""
    if not name:
        return "is empty"
    if len(name.encode(errors="replace")) > MAX_SECTION_NAME:
        return f"is longer than {MAX_SECTION_NAME} bytes"
    if _CONTROL.search(name) or not name.isprintable():
        return "holds control characters"
    return None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object repeats a key")
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _quote(text: str) -> str:
    """``text`` for a message: at most 64 characters, control characters escaped."""
    shown = repr(text[:64])[1:-1]
    return shown + "..." if len(text) > 64 else shown


def _write_all(fd: int, data: Buffer) -> int:
    with memoryview(data) as view, view.cast("B") as flat:
        done = 0
        while done < len(flat):
            done += os.write(fd, flat[done:])
        return done


def _read_at(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    try:
        data = os.pread(fd, length, offset)
        while 0 < len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        raise PortError(f"Unable to read from file: {exc.strerror}") from exc
    return data


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
