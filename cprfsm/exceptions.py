"""The one exception tree of cprfsm.

Every error the library raises on purpose derives from :class:`CprFsmError`.
Definition errors (a malformed model file) are kept apart from usage errors
(an unknown name in a request), refusals (QEMU would say no) and concurrency
conflicts, so callers can catch exactly what they can handle.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from cprfsm.legality import Verdict

__all__ = [
    "CprFsmError",
    "IllegalTransition",
    "ModelError",
    "StoreError",
    "UnknownNameError",
    "UsageError",
    "VersionConflict",
]


class CprFsmError(Exception):
    """Root of every error cprfsm raises on purpose."""


class ModelError(CprFsmError, TypeError):
    """A model file is malformed; the message names the file, the line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        """Record where the model is wrong and what is wrong there."""
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class UsageError(CprFsmError, ValueError):
    """A request is not well-formed; the message says what to write instead."""


class UnknownNameError(UsageError):
    """A name (capability, mode, runstate, version, ...) is not known to the model."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], *, context: str = "") -> None:
        """Say which name is unknown, list the valid ones and suggest the closest."""
        self.kind = kind
        self.name = name
        self.valid = tuple(valid)
        close = difflib.get_close_matches(name, self.valid, n=1)
        self.suggestion = close[0] if close else None
        where = f" in {context}" if context else ""
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion else ""
        super().__init__(
            f"unknown {kind} {name!r}{where}.{hint} Valid values: {', '.join(self.valid)}."
        )


class IllegalTransition(CprFsmError, ValueError):
    """QEMU would refuse the request; ``verdict`` says where, why and what to change."""

    def __init__(self, verdict: Verdict) -> None:
        """Carry the refusing verdict; the message is QEMU's own text plus the hint."""
        self.verdict = verdict
        super().__init__(verdict.summary())


class VersionConflict(CprFsmError):
    """An append expected one stream version but found another; nothing was written."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        """Record the stream and both versions; reload and decide again to recover."""
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r} is at version {actual}, not the expected {expected}: "
            "another writer appended first; reload the stream and decide again"
        )


class StoreError(CprFsmError):
    """An event store cannot be used: missing, corrupt, foreign or from a newer cprfsm."""
