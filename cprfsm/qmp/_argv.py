"""The QEMU command line of a :class:`~cprfsm.executor.VmDefinition`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cprfsm._files import inside
from cprfsm._options import parse_device
from cprfsm.exceptions import ExecutorError, UnsafePathError
from cprfsm.legality import MemoryBackend
from cprfsm.simulator import IMAGE_FORMATS

if TYPE_CHECKING:
    from pathlib import Path

    from cprfsm.executor import VmDefinition

DEFAULT_ACCEL = "tcg"
# IDE on -machine pc has four places; the boot disk takes the first.
_IDE_PLACES = 4


def default_qemu() -> str:
    """The QEMU binary: ``$CPRFSM_QEMU`` or ``qemu-system-x86_64`` on PATH."""
    return os.environ.get("CPRFSM_QEMU", "qemu-system-x86_64")


def default_qemu_img() -> str:
    """The qemu-img binary: ``$CPRFSM_QEMU_IMG`` or ``qemu-img`` on PATH."""
    return os.environ.get("CPRFSM_QEMU_IMG", "qemu-img")


def _plain(value: str, what: str) -> str:
    """``value`` unchanged if it cannot break out of a QEMU option list (no comma, not empty)."""
    if not value or "," in value or "\n" in value:
        raise ExecutorError(f"{what} {value!r} must be non-empty and contain no comma")
    return value


def _megabytes(size: int) -> str:
    """``size`` bytes as QEMU's size syntax in MiB."""
    if size <= 0 or size % 2**20:
        raise ExecutorError(f"RAM size {size} is not a positive whole number of MiB")
    return f"{size // 2**20}M"


def ram_file(definition: VmDefinition, workdir: Path) -> Path | None:
    """The file backing guest RAM (the spec's path, else one in ``workdir``), None if none."""
    backend = MemoryBackend.parse(definition.memory)
    if backend.kind != "file":
        return None
    if backend.path is None:
        return workdir / f"{_plain(backend.id, 'memory backend id')}.ram"
    try:  # a relative path is the work folder's, and stays in it
        return inside(workdir, _plain(backend.path, "memory path"), "the guest RAM file")
    except UnsafePathError as exc:
        raise ExecutorError(str(exc)) from None


def disk_images(definition: VmDefinition, workdir: Path) -> list[tuple[str, str, Path]]:
    """(format, node name, image path) of each image-format device, in definition order.

    Other devices (``vfio``...) have no stand-in here; pass them in ``extra_args``.
    """
    images = []
    for index, spec in enumerate(definition.devices):
        name, node = parse_device(spec, index)
        if name in IMAGE_FORMATS:
            node = _plain(node, "device node name")
            images.append((name, node, workdir / f"{node}.{name}"))
    if len(images) >= _IDE_PLACES:
        raise ExecutorError(f"at most {_IDE_PLACES - 1} disk images fit on IDE next to the boot")
    return images


def command_line(  # noqa: PLR0913 - every argument is one thing the command line says
    definition: VmDefinition,
    *,
    workdir: Path,
    qmp_socket: Path,
    boot_image: Path,
    paused: bool = False,
    incoming: bool = False,
    qemu: str | None = None,
    accel: str = DEFAULT_ACCEL,
) -> list[str]:
    """The argv that starts ``definition`` (files it names live in ``workdir``).

    The order: binary, accel, machine, RAM (``-m``, plus a ``memory-backend-*``
    object when the spec asks for one), ``-nodefaults -display none
    -no-user-config``, the QMP socket, the boot disk, disk images, ``-S``,
    ``-incoming defer``, then ``definition.extra_args`` verbatim.
    """
    backend = MemoryBackend.parse(definition.memory)
    size = _megabytes(definition.ram_size)
    machine = _plain(definition.machine, "machine type")
    argv = [qemu or default_qemu(), "-accel", _plain(accel, "accelerator")]
    memory: list[str] = []
    if backend.object:
        if backend.kind not in {"ram", "memfd", "file"}:
            raise ExecutorError(f"memory backend kind {backend.kind!r} is not ram, memfd or file")
        props = f"id={_plain(backend.id, 'memory backend id')},size={size}"
        props += f",share={'on' if backend.share else 'off'}"
        path = ram_file(definition, workdir)
        if path is not None:
            props += f",mem-path={_plain(str(path), 'memory path')}"
        memory = ["-object", f"memory-backend-{backend.kind},{props}"]
        machine += f",memory-backend={backend.id}"
    if definition.aux_ram_share:
        machine += ",aux-ram-share=on"
    argv += ["-machine", machine, "-m", size, *memory]
    argv += ["-nodefaults", "-display", "none", "-no-user-config"]
    argv += ["-qmp", f"unix:{_plain(str(qmp_socket), 'QMP socket path')},server=on,wait=off"]
    boot = _plain(str(boot_image), "boot image path")
    argv += ["-drive", f"file={boot},format=raw,if=ide,index=0,node-name=boot"]
    for index, (fmt, node, image) in enumerate(disk_images(definition, workdir), start=1):
        drive = f"file={_plain(str(image), 'image path')},format={fmt},if=ide,index={index}"
        argv += ["-drive", f"{drive},node-name={node}"]
    if paused:
        argv.append("-S")
    if incoming:
        argv += ["-incoming", "defer"]
    argv += definition.extra_args
    return argv
