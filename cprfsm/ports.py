"""Parts of a simulated QEMU: memory, devices, the migration channel and the host.

The lifecycle machine acts through one executor (:mod:`cprfsm.executor`).  The
simulated executor is the model's QEMU acting through these four parts: the
simulator's (:mod:`cprfsm.simulator`) perform every operation on real memory and
files, and :class:`RecordingPorts` keeps everything in memory and records every
call, for tests and notebooks (``RecordingPorts().executor()``).  A part reports
a failure by raising :class:`PortError` with the text QEMU would put in
``error-desc``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Protocol

import attrs

from cprfsm.exceptions import PortError
from cprfsm.executor import RamBlock, VmDefinition, ram_blocks

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cprfsm.executor import Executor

__all__ = [
    "ChannelPort",
    "DevicePort",
    "HostPort",
    "MemoryPort",
    "Ports",
    "RecordingPorts",
    "StreamHeader",
    "StreamReader",
    "StreamWriter",
    "Transfer",
]


@attrs.frozen(kw_only=True)
class StreamHeader:
    """What QEMU puts in a stream besides RAM and devices: configuration and global state."""

    qemu_version: str
    mode: str
    validated: frozenset[str]
    runstate: str
    was_suspended: bool


@attrs.frozen(kw_only=True)
class Transfer:
    """The outcome of a save or load: bytes moved, a digest of them, blocks touched."""

    bytes: int
    digest: str
    blocks: tuple[str, ...] = ()


class StreamWriter(Protocol):
    """An open outgoing migration stream."""

    def write(self, section: str, data: bytes) -> None:
        """Append one named section."""

    def commit(self) -> Transfer:
        """Finish the stream durably; the Transfer covers the whole stream."""

    def abort(self) -> None:
        """Give the stream up after a failure."""


class StreamReader(Protocol):
    """An open incoming migration stream."""

    @property
    def header(self) -> StreamHeader:
        """The stream's configuration and global state."""

    def read(self, section: str) -> bytes:
        """One named section; PortError if it is missing or damaged."""


class MemoryPort(Protocol):
    """Guest RAM of the current QEMU process."""

    def blocks(self) -> tuple[RamBlock, ...]:
        """The RAM blocks QEMU would migrate."""

    def save(self, writer: StreamWriter, skip: frozenset[str]) -> Transfer:
        """Write every block not in ``skip``."""

    def load(self, reader: StreamReader, skip: frozenset[str]) -> Transfer:
        """Read every block not in ``skip``; skipped blocks keep what they hold."""

    def digest(self) -> str:
        """A digest of all guest RAM as it is now."""


class DevicePort(Protocol):
    """The guest's device state."""

    def save(self, writer: StreamWriter) -> Transfer:
        """Write every device's state section."""

    def load(self, reader: StreamReader) -> Transfer:
        """Read every device's state section."""


class ChannelPort(Protocol):
    """Where migration streams go: the URI's transport."""

    def open_write(self, uri: str, header: StreamHeader) -> StreamWriter:
        """Create the stream at ``uri`` (QEMU: ``Could not create '…': …`` on failure)."""

    def open_read(self, uri: str) -> StreamReader:
        """Open the stream at ``uri`` (QEMU: ``Could not open '…': …`` on failure)."""


class HostPort(Protocol):
    """The host: QEMU processes come and go, reboots wipe volatile storage."""

    def start_qemu(self, definition: VmDefinition) -> None:
        """A QEMU process starts with this definition (its RAM is mapped afresh)."""

    def stop_qemu(self) -> None:
        """The QEMU process goes away; memory that only it held is gone."""

    def reboot(self) -> tuple[str, ...]:
        """Reboot; return the artefacts (URIs, RAM file paths) that did not survive."""

    def volatile(self, path: str) -> bool:
        """Whether ``path`` is on a filesystem a reboot wipes (tmpfs)."""


@attrs.frozen(kw_only=True)
class Ports:
    """The four ports a lifecycle machine acts through."""

    memory: MemoryPort
    devices: DevicePort
    channel: ChannelPort
    host: HostPort


def _digest(parts: Iterable[bytes]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


class _RecordingStream:
    """A stream kept in a dict; both the writer and the reader side."""

    def __init__(self, owner: RecordingPorts, uri: str, header: StreamHeader) -> None:
        self._owner = owner
        self._uri = uri
        self.header = header
        self.sections: dict[str, bytes] = {}

    def write(self, section: str, data: bytes) -> None:
        self._owner.calls.append(("stream.write", section))
        self._owner.maybe_fail("stream.write")
        self.sections[section] = bytes(data)

    def commit(self) -> Transfer:
        self._owner.calls.append(("stream.commit", self._uri))
        self._owner.maybe_fail("stream.commit")
        self._owner.files[self._uri] = self
        return Transfer(
            bytes=sum(len(d) for d in self.sections.values()),
            digest=_digest(self.sections.values()),
        )

    def abort(self) -> None:
        self._owner.calls.append(("stream.abort", self._uri))

    def read(self, section: str) -> bytes:
        self._owner.calls.append(("stream.read", section))
        self._owner.maybe_fail("stream.read")
        try:
            return self.sections[section]
        except KeyError:
            raise PortError(f"section {section!r} is missing from {self._uri}") from None


class RecordingPorts:
    """In-memory ports that record every call and can be told to fail an operation.

    Guest RAM is one token per block; a block in a ``file`` backend under
    ``/dev/shm`` or ``/tmp`` is volatile across a host reboot, any other
    path survives it.  Streams at ``file:`` URIs are volatile on the same rule.
    """

    def __init__(self) -> None:
        """Start with no QEMU process, no files and nothing recorded."""
        self.calls: list[tuple[str, str]] = []
        self.files: dict[str, _RecordingStream] = {}
        self.ram: dict[str, bytes] = {}
        self.shared_files: dict[str, bytes] = {}
        self.device_state = b"devices-v1"
        self._definition = VmDefinition()
        self._failures: dict[str, str] = {}
        self._executor: Executor | None = None

    def fail(self, operation: str, error: str) -> None:
        """Make the next call of ``operation`` (e.g. ``channel.open_write``) raise PortError."""
        self._failures[operation] = error

    def clear_failures(self) -> None:
        """Forget failures set with :meth:`fail` that did not happen."""
        self._failures.clear()

    def maybe_fail(self, operation: str) -> None:
        """Raise the failure set for ``operation``, once."""
        error = self._failures.pop(operation, None)
        if error is not None:
            raise PortError(error)

    def ports(self) -> Ports:
        """These recording ports as the simulated QEMU's four parts."""
        return Ports(memory=self, devices=_Devices(self), channel=self, host=self)

    def executor(self) -> Executor:
        """An executor (the model's QEMU) acting on these recording ports."""
        from cprfsm._qemu import SimulatedQemu  # noqa: PLC0415 - _qemu builds on this module

        if self._executor is None:
            self._executor = SimulatedQemu(self.ports(), volatile=_volatile, closing=_nothing)
        return self._executor

    # HostPort
    def start_qemu(self, definition: VmDefinition) -> None:
        """Map guest RAM: shared files keep their content, other memory starts empty."""
        self.calls.append(("host.start_qemu", definition.memory))
        self._definition = definition
        self.ram = {
            block.name: self.shared_files.get(block.path or "", b"") if block.named_file else b""
            for block in self.blocks()
        }

    def stop_qemu(self) -> None:
        """Drop memory only the process held; shared files keep theirs."""
        self.calls.append(("host.stop_qemu", ""))
        for block in self.blocks():
            if block.named_file and block.path:
                self.shared_files[block.path] = self.ram.get(block.name, b"")
        self.ram = {}

    def reboot(self) -> tuple[str, ...]:
        """Wipe volatile files and streams; return what was lost."""
        self.calls.append(("host.reboot", ""))
        lost = [path for path in self.shared_files if _volatile(path)]
        lost += [uri for uri in self.files if _volatile(uri.partition(":")[2])]
        for path in lost:
            self.shared_files.pop(path, None)
            self.files.pop(path, None)
        return tuple(sorted(lost))

    # MemoryPort
    def blocks(self) -> tuple[RamBlock, ...]:
        """The blocks QEMU creates for the current definition."""
        return ram_blocks(self._definition)

    def volatile(self, path: str) -> bool:
        """Paths under /dev/shm, /tmp and /run are volatile here."""
        return _volatile(path)

    def digest(self) -> str:
        """A digest of every block's token."""
        return _digest(self.ram[name] for name in sorted(self.ram))

    def write_guest(self, token: bytes) -> None:
        """The guest writes ``token`` into every RAM block."""
        self.ram = dict.fromkeys(self.ram, token)

    def save(self, writer: StreamWriter, skip: frozenset[str]) -> Transfer:
        """Write each block's token unless skipped."""
        self.calls.append(("memory.save", ",".join(sorted(skip))))
        self.maybe_fail("memory.save")
        written = [name for name in self.ram if name not in skip]
        for name in written:
            writer.write(f"ram/{name}", self.ram[name])
        return Transfer(
            bytes=sum(len(self.ram[n]) for n in written),
            digest=_digest(self.ram[n] for n in written),
            blocks=tuple(written),
        )

    def load(self, reader: StreamReader, skip: frozenset[str]) -> Transfer:
        """Read each block's token unless skipped."""
        self.calls.append(("memory.load", ",".join(sorted(skip))))
        self.maybe_fail("memory.load")
        loaded = [name for name in self.ram if name not in skip]
        for name in loaded:
            self.ram[name] = reader.read(f"ram/{name}")
        return Transfer(
            bytes=sum(len(self.ram[n]) for n in loaded),
            digest=_digest(self.ram[n] for n in loaded),
            blocks=tuple(loaded),
        )

    # ChannelPort
    def open_write(self, uri: str, header: StreamHeader) -> StreamWriter:
        """Open a stream kept in memory under ``uri``."""
        self.calls.append(("channel.open_write", uri))
        self.maybe_fail("channel.open_write")
        return _RecordingStream(self, uri, header)

    def open_read(self, uri: str) -> StreamReader:
        """Open a committed stream; QEMU's ``Could not open`` text if there is none."""
        self.calls.append(("channel.open_read", uri))
        self.maybe_fail("channel.open_read")
        stream = self.files.get(uri)
        if stream is None:
            path = uri.partition(":")[2]
            raise PortError(f"Could not open '{path}': No such file or directory")
        return stream


class _Devices:
    """The device port of RecordingPorts."""

    def __init__(self, owner: RecordingPorts) -> None:
        self._owner = owner

    def save(self, writer: StreamWriter) -> Transfer:
        self._owner.calls.append(("devices.save", ""))
        self._owner.maybe_fail("devices.save")
        writer.write("devices", self._owner.device_state)
        return Transfer(
            bytes=len(self._owner.device_state), digest=_digest([self._owner.device_state])
        )

    def load(self, reader: StreamReader) -> Transfer:
        self._owner.calls.append(("devices.load", ""))
        self._owner.maybe_fail("devices.load")
        data = reader.read("devices")
        self._owner.device_state = data
        return Transfer(bytes=len(data), digest=_digest([data]))


def _nothing() -> None:
    pass


def _volatile(path: str) -> bool:
    """tmpfs mount points a reboot empties (paths are only compared, never opened)."""
    return path.startswith(("/dev/shm/", "/tmp/", "/run/"))  # noqa: S108
