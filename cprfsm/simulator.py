"""The reference simulator: ports that perform the lifecycle's operations for real.

Guest RAM is mapped as its backend says: private or shared anonymous memory
(``ram``), a memfd (``memfd``) or a file mapped shared (``file,share=on``).
Each QEMU process maps it afresh, so anonymous and memfd RAM start zeroed and
a file keeps what the last process left in it.  Migration streams are state
files (:mod:`cprfsm.statefile`) at ``file:`` URIs; RAM streams from the
mapping in 8 MiB sections without being copied.  Every device has a small
state section whose counter moves as the guest runs; a block device (an image
format such as ``qcow2``) is backed by an image file whose write generation is
recorded at save and checked at load, so a disk modified between quit and
restart is detected (:class:`~cprfsm.exceptions.BlockDeviceChanged`).  A host
reboot deletes the state files and RAM files the simulator knows of on volatile
filesystems.  :class:`SimulatedQemu` is the executor made of the model's QEMU
acting through such ports; :meth:`Simulator.executor` builds one.

Import it as ``cprfsm.simulator``; ``import cprfsm`` loads it only when one of
its names is asked for.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import stat
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Self

import attrs

from cprfsm._files import ensure_directory, inside, open_regular, preallocate
from cprfsm._options import parse_device
from cprfsm._qemu import SimulatedQemu
from cprfsm.exceptions import BlockDeviceChanged, PortError, UnsafePathError, UsageError
from cprfsm.executor import RamBlock, VmDefinition
from cprfsm.legality import MemoryBackend
from cprfsm.ports import Ports, Transfer
from cprfsm.statefile import StateFileReader, StateFileWriter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from cprfsm.executor import Executor
    from cprfsm.ports import StreamHeader, StreamReader, StreamWriter

__all__ = ["IMAGE_FORMATS", "SimulatedQemu", "Simulator", "on_volatile_filesystem"]

IMAGE_FORMATS = frozenset({"qcow", "qcow2", "raw", "vdi", "vmdk", "vpc", "vhdx", "parallels"})
"""Device names that are disk image formats: the simulator backs each with an image file."""

_CHUNK = 8 * 2**20
_PATTERN = 2**20
_MACHINE_DEVICE = "pc"
_IMAGE_MAGIC = b"CPRDISK\n"
_IMAGE = struct.Struct(">8s16sQ")
_VOLATILE_TYPES = frozenset({"tmpfs", "ramfs"})
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def on_volatile_filesystem(path: str) -> bool:
    """Whether ``path`` is on tmpfs or ramfs (its longest mount point in /proc/self/mounts)."""
    target = os.path.realpath(path)
    found = ""
    volatile = False
    for line in Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines():
        _, escaped, fstype, *_ = line.split()
        mount = _MOUNT_ESCAPE.sub(lambda m: chr(int(m[1], 8)), escaped)
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        # A later line over the same mount point is the mount on top.
        if inside and len(mount) >= len(found):
            found, volatile = mount, fstype in _VOLATILE_TYPES
    return volatile


@attrs.frozen(kw_only=True)
class _Device:
    node: str
    model: str
    image: Path | None = None


@attrs.frozen(kw_only=True)
class _Image:
    identity: str
    generation: int


class _Process:
    """One simulated QEMU process: its mapped RAM and its devices' state."""

    def __init__(self, block: RamBlock, memory: mmap.mmap, devices: tuple[_Device, ...]) -> None:
        self.block = block
        self.memory = memory
        self.devices = devices
        self.counters = {device.node: 0 for device in devices}

    def chunks(self) -> Iterator[tuple[str, int, int]]:
        """The RAM sections: name, start and end offset."""
        for index, start in enumerate(range(0, self.block.size, _CHUNK)):
            yield f"ram/{self.block.name}/{index:04d}", start, min(start + _CHUNK, self.block.size)

    def device_sections(self) -> list[tuple[str, bytes]]:
        """Every device's state section as a save would write it now."""
        sections = []
        for device in self.devices:
            state: dict[str, object] = {
                "device": device.node,
                "model": device.model,
                "counter": self.counters[device.node],
            }
            if device.model == _MACHINE_DEVICE:
                state["devices"] = [d.node for d in self.devices]
            if device.image is not None:
                state["image"] = attrs.asdict(_read_image(device.image))
            sections.append((f"devices/{device.node}", _canonical(state)))
        return sections


class _Host:
    """The simulated host: files it knows, the current QEMU process (a HostPort)."""

    def __init__(self, workdir: Path, volatile: Callable[[str], bool]) -> None:
        self.workdir = workdir
        self._volatile = volatile
        self.definition = VmDefinition()
        self.process: _Process | None = None
        self.ram_files: set[str] = set()
        self.state_files: dict[Path, str] = {}

    def running(self) -> _Process:
        if self.process is None:
            raise PortError("QEMU is not running")
        return self.process

    def ram_block(self) -> RamBlock:
        """The RAM block of the current definition, named as QEMU names it."""
        backend = MemoryBackend.parse(self.definition.memory)
        name = backend.id if backend.object else "pc.ram"
        path = None
        if backend.kind == "file":
            # A relative path is the work folder's, as the QMP executor reads it, and stays there.
            path = str(inside(self.workdir, backend.path or name, "the guest RAM file"))
        return RamBlock(
            name=name,
            size=self.definition.ram_size,
            shared=backend.share,
            named_file=backend.kind == "file",
            path=path,
        )

    def devices(self) -> tuple[_Device, ...]:
        devices = [_Device(node=_MACHINE_DEVICE, model=_MACHINE_DEVICE)]
        for index, spec in enumerate(self.definition.devices):
            model, node = parse_device(spec, index)
            image = self.workdir / "disks" / f"{node}.{model}" if model in IMAGE_FORMATS else None
            devices.append(_Device(node=node, model=model, image=image))
        return tuple(devices)

    def start_qemu(self, definition: VmDefinition) -> None:
        """Start a process: map its RAM afresh and open (or create) its disk images."""
        self.stop_qemu()
        self.definition = definition
        block = self.ram_block()
        memory = _map(MemoryBackend.parse(definition.memory), block)
        if block.path is not None:
            self.ram_files.add(block.path)
        devices = self.devices()
        for device in devices:
            if device.image is not None:
                _create_image(device.image)
        self.process = _Process(block, memory, devices)

    def stop_qemu(self) -> None:
        """The process exits: its mappings go, files stay."""
        if self.process is not None:
            self.process.memory.close()
            self.process = None

    def volatile(self, path: str) -> bool:
        """Whether a reboot wipes ``path``."""
        return self._volatile(path)

    def reboot(self) -> tuple[str, ...]:
        """Delete the known RAM files and state files on volatile filesystems; list them."""
        self.stop_qemu()
        lost = []
        for path in sorted(self.ram_files):
            if self.volatile(path) and Path(path).exists():
                Path(path).unlink()
                lost.append(path)
        for state_file, uri in sorted(self.state_files.items()):
            if self.volatile(str(state_file)) and state_file.exists():
                state_file.unlink()
                lost.append(uri)
        self.ram_files.difference_update(lost)
        self.state_files = {p: u for p, u in self.state_files.items() if u not in lost}
        return tuple(sorted(lost))


class _Memory:
    """The MemoryPort: RAM streams between the mapping and 8 MiB sections."""

    def __init__(self, host: _Host) -> None:
        self._host = host

    def blocks(self) -> tuple[RamBlock, ...]:
        return (self._host.ram_block(),)

    def save(self, writer: StreamWriter, skip: frozenset[str]) -> Transfer:
        process = self._host.running()
        block = process.block
        writer.write("ram", _canonical([{"name": block.name, "size": block.size}]))
        if block.name in skip:
            return Transfer(bytes=0, digest=_chain([]))
        crcs = []
        with memoryview(process.memory) as whole:
            for section, start, end in process.chunks():
                with whole[start:end] as view:
                    if isinstance(writer, StateFileWriter):
                        writer.write(section, view)  # straight from the mapping
                        crcs.append((section, writer.checksum(section)))
                    else:
                        crcs.append((section, zlib.crc32(view)))
                        writer.write(section, bytes(view))
        return Transfer(bytes=block.size, digest=_chain(crcs), blocks=(block.name,))

    def digest(self) -> str:
        """A digest of all guest RAM; a save that skips nothing records the same."""
        process = self._host.running()
        crcs = []
        with memoryview(process.memory) as whole:
            for section, start, end in process.chunks():
                with whole[start:end] as view:
                    crcs.append((section, zlib.crc32(view)))
        return _chain(crcs)

    def load(self, reader: StreamReader, skip: frozenset[str]) -> Transfer:
        process = self._host.running()
        block = process.block
        for entry in json.loads(reader.read("ram")):
            if entry["name"] != block.name:
                # QEMU's text (migration/ram.c:parse_ramblock).
                raise PortError(f'Unknown ramblock "{entry["name"]}", cannot accept migration')
            if entry["size"] != block.size:
                raise PortError(
                    f"Length mismatch: {block.name}: 0x{entry['size']:x} in != "
                    f"0x{block.size:x}: Invalid argument"
                )
        if block.name in skip:
            return Transfer(bytes=0, digest=_chain([]))
        crcs = []
        for section, start, end in process.chunks():
            data = reader.read(section)
            if len(data) != end - start:
                raise PortError(
                    f"section {section!r} holds {len(data)} bytes, not the {end - start} "
                    f"of RAM block {block.name} at offset 0x{start:x}"
                )
            process.memory[start:end] = data
            crc = reader.checksum(section) if isinstance(reader, StateFileReader) else None
            crcs.append((section, zlib.crc32(data) if crc is None else crc))
        return Transfer(bytes=block.size, digest=_chain(crcs), blocks=(block.name,))


class _Devices:
    """The DevicePort: one state section per device."""

    def __init__(self, host: _Host) -> None:
        self._host = host

    def save(self, writer: StreamWriter) -> Transfer:
        sections = self._host.running().device_sections()
        for name, data in sections:
            writer.write(name, data)
        return Transfer(bytes=sum(len(d) for _, d in sections), digest=_digest(sections))

    def load(self, reader: StreamReader) -> Transfer:
        process = self._host.running()
        sections = [
            (f"devices/{d.node}", reader.read(f"devices/{d.node}")) for d in process.devices
        ]
        states = [json.loads(data) for _, data in sections]
        ours = {d.node: d.model for d in process.devices}
        for node in states[0]["devices"]:  # the machine's own section comes first
            if node not in ours:
                raise _unknown_section(node)
        for device, state in zip(process.devices, states, strict=True):
            if state["model"] != device.model:
                raise _unknown_section(device.node)
            if device.image is not None:
                _check_image(device.node, device.image, _Image(**state["image"]))
        for device, state in zip(process.devices, states, strict=True):
            process.counters[device.node] = state["counter"]
        return Transfer(bytes=sum(len(d) for _, d in sections), digest=_digest(sections))


class _Channel:
    """The ChannelPort: state files at ``file:`` URIs; no other transport is simulated."""

    def __init__(self, host: _Host) -> None:
        self._host = host

    def open_write(self, uri: str, header: StreamHeader) -> StreamWriter:
        path = self._path(uri)
        writer = StateFileWriter(path, header)
        self._host.state_files[path] = uri
        return writer

    def open_read(self, uri: str) -> StreamReader:
        path = self._path(uri)
        reader = StateFileReader(path)
        self._host.state_files[path] = uri
        return reader

    def _path(self, uri: str) -> Path:
        scheme, _, rest = uri.partition(":")
        if scheme != "file":
            # What a QEMU built without the transport says.
            raise PortError(f"unknown migration protocol: {uri}")
        if ",offset=" in rest:
            raise PortError(f"the simulator writes whole files, not at an offset: {uri}")
        try:
            return inside(self._host.workdir, rest, "the state file")
        except UnsafePathError as exc:
            raise PortError(str(exc)) from None


class Simulator:
    """Ports that perform the operations for real, under ``workdir``.

    ``volatile(path)`` says whether a host reboot wipes ``path``; the default
    is :func:`on_volatile_filesystem`.  The methods besides :meth:`ports` are
    the guest's actions and what a test inspects.
    """

    def __init__(self, workdir: Path, *, volatile: Callable[[str], bool] | None = None) -> None:
        """Keep default RAM files and disk images under ``workdir`` (created if missing)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self._host = _Host(workdir, volatile or on_volatile_filesystem)
        self._ports = Ports(
            memory=_Memory(self._host),
            devices=_Devices(self._host),
            channel=_Channel(self._host),
            host=self._host,
        )
        self._executor: Executor | None = None

    def __enter__(self) -> Self:
        """Use the simulator in a with block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the simulated QEMU process."""
        self.close()

    def close(self) -> None:
        """Stop the simulated QEMU process (unmapping its RAM); files stay."""
        self._host.stop_qemu()

    def ports(self) -> Ports:
        """The four parts the simulated QEMU acts through."""
        return self._ports

    def executor(self) -> Executor:
        """The executor of a :class:`~cprfsm.machine.VirtualMachine`: the model's QEMU, here."""
        if self._executor is None:
            self._executor = SimulatedQemu(
                self._ports, volatile=self._host.volatile, closing=self.close
            )
        return self._executor

    def guest_write(self, marker: bytes, seed: int) -> None:
        """The guest fills all its RAM: ``marker`` and the offset open every 8 MiB, then a pattern.

        Every device's counter moves, as the guest runs.
        """
        process = self._host.running()
        fill = random.Random(seed).randbytes(_PATTERN) * (_CHUNK // _PATTERN)  # noqa: S311
        with memoryview(process.memory) as whole:
            for _, start, end in process.chunks():
                stamp = (marker + start.to_bytes(8, "big"))[: end - start]
                whole[start:end] = fill[: end - start]
                whole[start : start + len(stamp)] = stamp
        for node in process.counters:
            process.counters[node] += 1

    def guest_read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of guest RAM at ``offset``."""
        return self._host.running().memory[offset : offset + length]

    def guest_disk_write(self, name: str) -> None:
        """The guest writes to block device ``name``: its image's generation moves on."""
        process = self._host.running()
        _bump_image(self.disk_image(name))
        process.counters[name] += 1

    def modify_disk(self, name: str) -> None:
        """Someone else writes to block device ``name``'s image (an out-of-band change)."""
        _bump_image(self.disk_image(name))

    def disk_image(self, name: str) -> Path:
        """The image file of block device ``name`` (a node name, ``qcow20`` by default)."""
        images = {d.node: d.image for d in self._host.devices() if d.image is not None}
        if name not in images:
            known = ", ".join(sorted(images)) or "none"
            raise UsageError(f"no block device {name!r} (block devices: {known})")
        return images[name]

    def ram_digest(self) -> str:
        """A digest of guest RAM (the memory port's); a save that skips nothing records it."""
        return self._ports.memory.digest()

    def device_digest(self) -> str:
        """A digest of device state; a save records the same digest."""
        return _digest(self._host.running().device_sections())


def _map(backend: MemoryBackend, block: RamBlock) -> mmap.mmap:
    flags = mmap.MAP_SHARED if backend.share else mmap.MAP_PRIVATE
    if backend.kind == "ram":
        try:
            return mmap.mmap(-1, block.size, flags=flags)
        except (OSError, OverflowError) as exc:
            raise _no_memory(block, exc) from None
    if backend.kind == "memfd":
        fd = os.memfd_create(block.name, os.MFD_CLOEXEC)
    elif backend.kind == "file" and block.path is not None:
        return _map_file(Path(block.path), block, flags)
    else:
        raise UsageError(f"the simulator maps ram, memfd and file backends, not {backend.kind!r}")
    try:
        os.ftruncate(fd, block.size)
        return mmap.mmap(fd, block.size, flags=flags)
    except (OSError, OverflowError) as exc:
        raise _no_memory(block, exc) from None
    finally:
        os.close(fd)  # the mapping keeps the memfd alive


def _map_file(path: Path, block: RamBlock, flags: int) -> mmap.mmap:
    """Map a RAM file: never through a symlink, and shared pages allocated before the guest runs.

    A shared mapping of a sparse file gets SIGBUS on the first write the filesystem
    has no room for; allocating the file first turns that into ENOSPC here.
    """
    try:
        fd, created = open_regular(path, "the guest RAM file")
    except UnsafePathError as exc:
        raise PortError(f"can't open backing store {path} for guest RAM: {exc.problem}") from None
    except OSError as exc:
        # QEMU's text (system/physmem.c:qemu_ram_alloc_from_file).
        msg = f"can't open backing store {path} for guest RAM: {exc.strerror}"
        raise PortError(msg) from exc
    try:
        if flags == mmap.MAP_SHARED:
            preallocate(fd, block.size)
        elif os.fstat(fd).st_size < block.size:
            os.ftruncate(fd, block.size)  # private: written pages are anonymous copies
        return mmap.mmap(fd, block.size, flags=flags)
    except (OSError, OverflowError) as exc:
        if created:
            path.unlink(missing_ok=True)  # leave no full filesystem behind
        raise _no_memory(block, exc) from None
    finally:
        os.close(fd)  # the mapping keeps the file alive


def _no_memory(block: RamBlock, exc: OSError | OverflowError) -> PortError:
    """QEMU's text for RAM it cannot set up (system/physmem.c), with the size asked for."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "size out of range"
    return PortError(f"cannot set up guest memory '{block.name}' ({block.size} bytes): {why}")


def _create_image(path: Path) -> None:
    """Create the image if it is new; an existing one must be a regular file (never a symlink)."""
    _write_image(path, None)


def _write_image(path: Path, image: _Image | None) -> None:
    """Write a new image's header (``image`` None: a fresh identity, if the file is new)."""
    try:
        ensure_directory(path.parent, "the disk image folder")
        fd, created = open_regular(path, "disk image")
    except UnsafePathError as exc:
        raise PortError(f"Could not open '{path}': {exc.problem}") from None
    except OSError as exc:
        raise PortError(f"Could not open '{path}': {exc.strerror}") from exc
    try:
        if image is not None or created:
            identity = bytes.fromhex(image.identity) if image and image.identity else None
            generation = image.generation if image else 0
            data = _IMAGE.pack(_IMAGE_MAGIC, identity or os.urandom(16), generation)
            os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def _read_image(path: Path) -> _Image:
    """The image's identity and generation; a missing, foreign or special file has no identity."""
    data = b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                data = os.pread(fd, _IMAGE.size, 0)
        finally:
            os.close(fd)
    try:
        magic, identity, generation = _IMAGE.unpack(data)
    except struct.error:
        magic = b""
    if magic != _IMAGE_MAGIC:
        return _Image(identity="", generation=0)
    return _Image(identity=identity.hex(), generation=generation)


def _bump_image(path: Path) -> None:
    image = _read_image(path)
    _write_image(path, _Image(identity=image.identity, generation=image.generation + 1))


def _check_image(node: str, image: Path, saved: _Image) -> None:
    now = _read_image(image)
    if now.identity != saved.identity:
        raise BlockDeviceChanged(node, image, "is not the image that was saved")
    if now.generation != saved.generation:
        raise BlockDeviceChanged(
            node,
            image,
            f"was written to (generation {now.generation}, saved at {saved.generation})",
        )


def _unknown_section(node: str) -> PortError:
    """QEMU's text for a saved device the destination does not have (migration/savevm.c)."""
    return PortError(
        f"Unknown savevm section or instance 'devices/{node}' 0. Make sure that your current "
        "VM setup matches your saved VM setup, including any hotplugged devices"
    )


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _chain(crcs: list[tuple[str, int]]) -> str:
    """BLAKE2b-128 over each RAM section's name and CRC-32: cheap, and order-sensitive."""
    hasher = hashlib.blake2b(digest_size=16)
    for section, crc in crcs:
        hasher.update(section.encode() + crc.to_bytes(4, "big"))
    return hasher.hexdigest()


def _digest(sections: list[tuple[str, bytes]]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for section, data in sections:
        hasher.update(section.encode() + len(data).to_bytes(8, "big") + data)
    return hasher.hexdigest()
