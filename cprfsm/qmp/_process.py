"""Start QEMU so that it dies with its controller, and end it for good."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from contextlib import suppress
from typing import TYPE_CHECKING

from cprfsm.executor import Exited

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None]:
    """A pre-exec step: SIGKILL this child when the thread that forked it dies.

    libc is resolved here, in the parent, so the child only makes two system calls.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def step() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(127)

    return step


def spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, stderr to ``log``, killed if its parent dies."""
    with log.open("ab") as stderr:
        return subprocess.Popen(  # noqa: S603 - the argv is built by command_line
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - no threads are started in between
        )


def kill_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGKILL the process and its process group (``exec:`` children), then reap it.

    The group is killed even after QEMU itself ended: an ``exec:`` migration
    command may outlive it.
    """
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def last_words(log: Path, program: str) -> str:
    """QEMU's last non-empty stderr line, without its ``program: `` prefix."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    prefix = f"{os.path.basename(program)}: "  # noqa: PTH119 - a program name, not a path
    words = [line.removeprefix(prefix) for line in lines if line.strip()]
    return words[-1] if words else ""


def exited(returncode: int, message: str) -> Exited:
    """The exit fact of a process that ended with ``returncode`` (negative: a signal)."""
    if returncode < 0:
        return Exited(signal=-returncode, message=message)
    return Exited(code=returncode, message=message)
