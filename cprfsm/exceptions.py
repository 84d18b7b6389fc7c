"""The one exception tree of cprfsm.

Every error the library raises on purpose derives from :class:`CprFsmError`.
Definition errors (a malformed model file) are kept apart from usage errors
(an unknown name in a request), refusals (QEMU would say no), failed
operations, store problems and concurrency conflicts, so callers can catch
exactly what they can handle.  This module is the ground floor: it imports
nothing of cprfsm at run time, and every public exception lives here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from cprfsm.events import Event
    from cprfsm.legality import Verdict
    from cprfsm.vm_events import ModelDiverged

__all__ = [
    "BlockDeviceChanged",
    "CommandFailed",
    "CorruptSection",
    "CorruptStateFile",
    "CorruptStoreError",
    "CprFsmError",
    "DamagedStreamError",
    "DuplicateEventIdError",
    "EventDecodeError",
    "ExecutorError",
    "ForeignStateFile",
    "ForeignStoreError",
    "IllegalTransition",
    "InvalidHeader",
    "InvalidSection",
    "LogMismatchError",
    "MalformedEventError",
    "MissingSection",
    "ModelDivergence",
    "ModelError",
    "NewerEventVersionError",
    "NewerStoreError",
    "PortError",
    "QemuAbortPredicted",
    "ResourceError",
    "StateFileError",
    "StoreError",
    "StoreFileError",
    "StoreNotFoundError",
    "TruncatedStateFile",
    "UnknownEventTypeError",
    "UnknownNameError",
    "UnsafePathError",
    "UnsupportedStateFile",
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
        import difflib  # noqa: PLC0415 - only a mistake pays for it, not ``import cprfsm``

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


class LogMismatchError(StoreError):
    """An event log asks for something the model forbids: it was not written by this model."""


# --- Running a VM: the machine and its executor ----------------------------------------------


class CommandFailed(CprFsmError):
    """QEMU accepted the command, then it failed with ``error``; ``events`` say what happened."""

    def __init__(self, command: str, error: str, events: tuple[Event, ...]) -> None:
        """Carry the command, QEMU's text and the events recorded on the way."""
        self.command = command
        self.error = error
        self.events = events
        super().__init__(f"{command} failed: {error}")


class QemuAbortPredicted(CprFsmError):
    """QEMU's own logic asks for a runstate change its table forbids: QEMU aborts there.

    Predicted before acting, nothing is recorded and ``events`` is empty.  When
    the abort follows a failed operation, the process is gone and ``events``
    ends with its exit.
    """

    def __init__(self, error: str, events: tuple[Event, ...]) -> None:
        """Carry what QEMU prints as it aborts and the events recorded up to the abort."""
        self.error = error
        self.events = events
        super().__init__(f"{error}: QEMU aborts here, the process is gone")


class ModelDivergence(CprFsmError):
    """QEMU reported facts the model did not predict (raised in strict mode, after recording)."""

    def __init__(self, divergence: ModelDiverged) -> None:
        """Carry the recorded divergence: the command, what was expected and what QEMU did."""
        self.divergence = divergence
        super().__init__(
            f"{divergence.command}: QEMU reported {', '.join(divergence.observed) or 'nothing'}; "
            f"the model predicted {', '.join(divergence.expected) or 'nothing'}. "
            "The log adopted QEMU's facts; report the difference against models/qemu.yaml"
        )


class ExecutorError(CprFsmError):
    """The executor could not carry out a command: QEMU did not answer in time, or is gone.

    ``waiting_for`` says what it was waiting for when it gave up.
    """

    def __init__(self, message: str, *, waiting_for: str = "") -> None:
        """Carry what went wrong and what the executor was waiting for."""
        self.waiting_for = waiting_for
        super().__init__(message)


class PortError(CprFsmError):
    """An operation failed; ``error`` is what QEMU reports for it."""

    def __init__(self, error: str) -> None:
        """Carry QEMU's text for the failure."""
        self.error = error
        super().__init__(error)


class BlockDeviceChanged(PortError):
    """A block device's image changed between save and restore (cpr-reboot forbids it)."""

    def __init__(self, device: str, path: Path, detail: str) -> None:
        """Name the device, its image and what changed."""
        self.device = device
        self.path = path
        super().__init__(
            f"block device '{device}' changed between save and restore: {path} {detail}; "
            "cpr-reboot needs guest disks left unmodified until the restart"
        )


# --- State files (cprfsm.statefile) ------------------------------------------------------------

# QEMU's QEMU_VM_FILE_MAGIC, to tell a QEMU stream from other foreign files.
_QEMU_MAGIC = b"QEVM"
# As many bytes as a cprfsm state file's magic, shown from a foreign file's start.
_SHOWN_START = 8


class StateFileError(PortError):
    """A state file is not one this module can load; ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        """Carry the file and the whole message."""
        self.path = path
        super().__init__(message)


class ForeignStateFile(StateFileError):
    """The file is not a cprfsm state file (a QEMU stream, or anything else)."""

    def __init__(self, path: str, start: bytes) -> None:
        """Say what the file looks like instead."""
        if start.startswith(_QEMU_MAGIC):
            what = "a QEMU migration stream (magic QEVM)"
        else:
            what = f"something else (it starts with {start[:_SHOWN_START]!r})"
        super().__init__(path, f"{path} is not a cprfsm state file: it is {what}")


class UnsupportedStateFile(StateFileError):
    """The file has a format version this module does not read."""

    def __init__(self, path: str, version: int, *, reads: int) -> None:
        """Name the file's version and the one this cprfsm reads."""
        self.version = version
        super().__init__(
            path,
            f"{path} is a cprfsm state file of format version {version}; "
            f"this cprfsm reads version {reads}",
        )


class TruncatedStateFile(StateFileError):
    """The file ends before its end marker: a save that did not finish, or a cut copy."""

    def __init__(self, path: str, size: int, where: str) -> None:
        """Say where the file ends."""
        super().__init__(path, f"{path} is truncated: it ends at byte {size}, {where}")


class CorruptStateFile(StateFileError):
    """Part of the file does not match its checksum or the end marker's digest."""

    def __init__(self, path: str, what: str) -> None:
        """Say which part is damaged."""
        super().__init__(path, f"{path} is corrupt: {what}")


class CorruptSection(CorruptStateFile):
    """One section's payload does not match its checksum; ``section`` names it."""

    def __init__(self, path: str, section: str) -> None:
        """Name the section and the file."""
        self.section = section
        StateFileError.__init__(
            self, path, f"section {section!r} of {path} is corrupt: checksum mismatch"
        )


class InvalidHeader(CorruptStateFile):
    """The header breaks the schema (a crafted or foreign file); ``field`` names the field."""

    def __init__(self, path: str, field: str | None, problem: str) -> None:
        """Name the field (None for the header as a whole) and what is wrong with it."""
        self.field = field
        what = "the header" if field is None else f"the header field {field!r}"
        super().__init__(path, f"{what} {problem}; save the VM again to replace the file")


class InvalidSection(CorruptStateFile):
    """A section record breaks the schema; ``section`` names it (None if its name is bad)."""

    def __init__(self, path: str, section: str | None, offset: int, problem: str) -> None:
        """Name the section, or the byte its record starts at, and what is wrong."""
        self.section = section
        self.offset = offset
        what = (
            f"the section record at byte {offset}"
            if section is None
            else f"section {section!r} (record at byte {offset})"
        )
        super().__init__(path, f"{what} {problem}; save the VM again to replace the file")


class MissingSection(StateFileError):
    """The file has no section of that name."""

    def __init__(self, path: str, section: str) -> None:
        """Name the section and the file."""
        self.section = section
        super().__init__(path, f"section {section!r} is missing from {path}")
