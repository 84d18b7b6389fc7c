"""Files cprfsm names: safe to create, never written through, and what room they need.

A file cprfsm creates is opened with ``O_NOFOLLOW`` and, where it is new,
``O_EXCL``; one that exists must be a regular file (a symlink, device, FIFO or
socket is refused, never written through or replaced).  A relative name stays
under the work folder it is relative to.  Component names (memory backend ids,
block node names, VM names) are QEMU identifiers, so none of them is a path.
The figures the demo checks before it starts (memory, free space) come from
here too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import stat
from pathlib import Path

from cprfsm.exceptions import ResourceError, UnsafePathError, UsageError

#: A QEMU identifier (``id_wellformed``): a letter, then letters, digits, ``-``, ``.``, ``_``.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
#: QEMU keeps block node names in 32 bytes with the terminating NUL.
NODE_NAME_LIMIT = 31
#: Ids become file names (``ID.ram``); keep them well inside NAME_MAX.
NAME_LIMIT = 127

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def check_name(value: str, what: str, *, context: str = "", limit: int = NAME_LIMIT) -> str:
    """``value`` if it is a QEMU identifier of at most ``limit`` characters, else UsageError."""
    if _NAME.match(value) is None or len(value) > limit:
        where = f" in {context}" if context else ""
        raise UsageError(
            f"{what} {value!r}{where} is not a name: write a letter, then letters, digits, "
            f"'-', '.' or '_', at most {limit} characters"
        )
    return value


def not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file (``a FIFO``...), else None."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def refuse_special(path: str | os.PathLike[str], what: str) -> None:
    """UnsafePathError if ``path`` exists and is not a regular file (a symlink is not one)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafePathError(path, what, exc.strerror or str(exc)) from None
    kind = not_regular(mode)
    if kind is not None:
        raise UnsafePathError(path, what, f"is {kind}")


def ensure_directory(path: Path, what: str) -> Path:
    """Make the directory ``path`` (and parents) if missing; UnsafePathError if it is a symlink."""
    with contextlib.suppress(FileExistsError):  # a file of another kind: lstat names it
        path.mkdir(parents=True, exist_ok=True)
    mode = os.lstat(path).st_mode
    if not stat.S_ISDIR(mode):
        kind = not_regular(mode) or "a regular file"
        raise UnsafePathError(path, what, f"is {kind}", "give a directory of your own")
    return path


def inside(workdir: Path, name: str | os.PathLike[str], what: str) -> Path:
    """``name`` as a path: an absolute one as given, a relative one under ``workdir``.

    A relative name that leaves ``workdir`` (through ``..`` or a symlink) is an
    UnsafePathError: cprfsm writes relative names only inside its work folder.
    """
    path = Path(name)
    if path.is_absolute():
        return path
    joined = Path(os.path.normpath(workdir.absolute() / path))
    base = Path(os.path.realpath(workdir))
    real = Path(os.path.realpath(joined))
    if real != base and base not in real.parents:
        raise UnsafePathError(
            name, what, f"leaves the work folder {workdir}", "give a name inside it or a full path"
        )
    return joined


def open_regular(path: str | os.PathLike[str], what: str) -> tuple[int, bool]:
    """Open ``path`` read-write without following a symlink; return the fd and whether it is new.

    A new file is created with ``O_EXCL`` (mode 0600); an existing one must be
    a regular file.  UnsafePathError otherwise; OSError if the system refuses.
    """
    refuse_special(path, what)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(path, what, "is a symbolic link") from None
        raise
    kind = not_regular(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise UnsafePathError(path, what, f"is {kind}")
    return fd, False


def preallocate(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the file now: a full filesystem is ENOSPC, not a later SIGBUS."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}:
            raise
        os.ftruncate(fd, max(size, os.fstat(fd).st_size))  # no fallocate here: sparse


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new file's space would come from)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space(path: Path) -> tuple[int, int]:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem, and its device id."""
    probe = existing_ancestor(path)
    found = os.statvfs(probe)
    return found.f_bavail * found.f_frsize, probe.stat().st_dev


def allocated(path: Path) -> int:
    """Bytes allocated to the regular file ``path`` (0 if it is missing or of another kind)."""
    try:
        found = os.lstat(path)
    except OSError:
        return 0
    return found.st_blocks * 512 if stat.S_ISREG(found.st_mode) else 0


def memory_available() -> int | None:
    """The host's MemAvailable in bytes, or None where /proc/meminfo does not say."""
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def address_space_limit() -> int | None:
    """The soft ``ulimit -v`` (RLIMIT_AS) in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def address_space_used() -> int:
    """This process's mapped address space (VmSize) in bytes, 0 where /proc does not say."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return 0
    match = re.search(r"^VmSize:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def file_size_limit() -> int | None:
    """The soft ``ulimit -f`` (RLIMIT_FSIZE) in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def human(size: int) -> str:
    """``size`` bytes as a figure people read: ``64.0 MiB``, ``30.0 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover - the loop returns at PiB


def require(what: str, needed: int, available: int | None, source: str, remedy: str) -> None:
    """ResourceError naming both figures when ``needed`` exceeds ``available`` (None: unknown).

    ``source`` says where ``available`` comes from, with ``{}`` where the figure goes.
    """
    if available is not None and needed > available:
        raise ResourceError(
            f"{what} needs {human(needed)}, but {source.format(human(available))}; {remedy}"
        )
