"""The one exception tree of cprfsm.

Every error the library raises on purpose derives from :class:`CprFsmError`.
Definition errors (a malformed model file) are kept apart from usage errors
(an unknown name in a request), refusals (QEMU would say no) and concurrency
conflicts, so callers can catch exactly what they can handle.
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from cprfsm.legality import Verdict

__all__ = [
    "CorruptStoreError",
    "CprFsmError",
    "DamagedStreamError",
    "DuplicateEventIdError",
    "EventDecodeError",
    "ForeignStoreError",
    "IllegalTransition",
    "MalformedEventError",
    "ModelError",
    "NewerEventVersionError",
    "NewerStoreError",
    "ResourceError",
    "StoreError",
    "StoreFileError",
    "StoreNotFoundError",
    "UnknownEventTypeError",
    "UnknownNameError",
    "UnsafePathError",
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


class UnsafePathError(UsageError):
    """A path cprfsm would write is a symlink, device or FIFO, or leaves the work folder."""

    def __init__(
        self, path: str | os.PathLike[str], what: str, problem: str, remedy: str = ""
    ) -> None:
        """Name the path, what cprfsm meant to keep there, what is wrong and what to do."""
        self.path = os.fspath(path)
        self.problem = problem
        remedy = remedy or (
            "cprfsm neither writes through it nor replaces it; "
            "give the path of a regular file or of a new one"
        )
        super().__init__(f"{what} {self.path} {problem}; {remedy}")


class ResourceError(CprFsmError):
    """The host lacks the memory or disk space a request needs; the message names both figures."""


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


class StoreFileError(StoreError):
    """A store file cannot be opened; the message names the file, the problem and what to do."""

    def __init__(self, path: str | os.PathLike[str], problem: str, remedy: str) -> None:
        """Record the file and what is wrong with it; the file itself was left untouched."""
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; {remedy}")


class StoreNotFoundError(StoreFileError):
    """No store exists at the path and the caller asked not to create one."""


class ForeignStoreError(StoreFileError):
    """The file is not a cprfsm event store: another kind of file or another application's."""


class CorruptStoreError(StoreFileError):
    """The file is a cprfsm event store that is damaged or truncated."""


class DamagedStreamError(CorruptStoreError):
    """A stream's events were deleted, reordered, duplicated or edited; names the first bad one."""

    def __init__(
        self, path: str | os.PathLike[str], stream: str, version: int, problem: str
    ) -> None:
        """Record the stream and the first version at which its log is not what was written."""
        self.stream = stream
        self.version = version
        super().__init__(
            path,
            f"stream {stream!r} is damaged at version {version}: {problem}",
            "restore the store from a backup; cprfsm did not modify it",
        )


class NewerStoreError(StoreFileError):
    """The store was written by a newer cprfsm whose schema this version cannot read."""


class DuplicateEventIdError(StoreError):
    """An event id is already stored with other content or elsewhere; nothing was written."""

    def __init__(self, stream: str, event_id: str, problem: str) -> None:
        """Record the stream appended to, the clashing id and how the stored event differs."""
        self.stream = stream
        self.event_id = event_id
        self.problem = problem
        super().__init__(
            f"event id {event_id!r} appended to stream {stream!r} is already stored {problem}: "
            "reuse an event id only to retry the very same batch, or leave event ids out "
            "to have fresh ones generated"
        )


class EventDecodeError(StoreError):
    """A stored event cannot be turned back into an event object."""

    def __init__(self, type_tag: str, schema_version: int, problem: str, remedy: str) -> None:
        """Record the event's type tag and schema version, what is wrong and what to do."""
        self.type_tag = type_tag
        self.schema_version = schema_version
        self.problem = problem
        super().__init__(
            f"cannot decode event {type_tag!r} (schema version {schema_version}): "
            f"{problem}; {remedy}"
        )


class UnknownEventTypeError(EventDecodeError):
    """No event class is registered under the stored type tag."""


class NewerEventVersionError(EventDecodeError):
    """The event was stored with a schema version newer than its registered class."""


class MalformedEventError(EventDecodeError):
    """The stored payload is not valid JSON or does not fit the event class's fields."""
