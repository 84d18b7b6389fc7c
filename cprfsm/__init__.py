"""cprfsm: a model of how QEMU stops, saves, restarts and resumes a virtual machine.

Everything a notebook user or a VMM author needs imports from here: ask
:func:`check` what QEMU would do with a :class:`Configuration`, drive a
:class:`VirtualMachine` through an executor with its events in an
:class:`InMemoryStore` or :class:`SQLiteStore`, and :func:`replay` or
:func:`rebuild` its :class:`VmState` from the log.  Every error is in
:mod:`cprfsm.exceptions`, under :class:`CprFsmError`.

``import cprfsm`` loads only the exceptions; each other name loads its module
the first time it is used (PEP 562), so the command line and scripts that
need a little start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cprfsm.exceptions import (
    BlockDeviceChanged,
    CommandFailed,
    CorruptSection,
    CorruptStateFile,
    CorruptStoreError,
    CprFsmError,
    DamagedStreamError,
    DuplicateEventIdError,
    EventDecodeError,
    ExecutorError,
    ForeignStateFile,
    ForeignStoreError,
    IllegalTransition,
    InvalidHeader,
    InvalidSection,
    LogMismatchError,
    MalformedEventError,
    MissingSection,
    ModelDivergence,
    ModelError,
    NewerEventVersionError,
    NewerStoreError,
    PortError,
    QemuAbortPredicted,
    ResourceError,
    StateFileError,
    StoreError,
    StoreFileError,
    StoreNotFoundError,
    TruncatedStateFile,
    UnknownEventTypeError,
    UnknownNameError,
    UnsafePathError,
    UnsupportedStateFile,
    UsageError,
    VersionConflict,
)

if TYPE_CHECKING:
    from cprfsm.events import Event
    from cprfsm.executor import (
        Command,
        Executor,
        Exited,
        MigrationSettings,
        QmpEvent,
        RamBlock,
        Report,
        Transferred,
        VmDefinition,
    )
    from cprfsm.legality import Configuration, MemoryBackend, Reason, Verdict, check
    from cprfsm.lifecycle import PHASES, VmState, phase_of, rebuild, replay
    from cprfsm.machine import VirtualMachine
    from cprfsm.model import QemuModel, Rule, load_model, modelled_releases
    from cprfsm.simulator import Simulator
    from cprfsm.store import EventStore, InMemoryStore, RecordedEvent, Snapshot, SQLiteStore

__version__ = "0.1.0.dev0"

# Each name loaded on first use, and the module it lives in.
_LAZY = {
    "Event": "cprfsm.events",
    **dict.fromkeys(
        (
            "Command",
            "Executor",
            "Exited",
            "MigrationSettings",
            "QmpEvent",
            "RamBlock",
            "Report",
            "Transferred",
            "VmDefinition",
        ),
        "cprfsm.executor",
    ),
    **dict.fromkeys(
        ("Configuration", "MemoryBackend", "Reason", "Verdict", "check"), "cprfsm.legality"
    ),
    **dict.fromkeys(("PHASES", "VmState", "phase_of", "rebuild", "replay"), "cprfsm.lifecycle"),
    "VirtualMachine": "cprfsm.machine",
    **dict.fromkeys(("QemuModel", "Rule", "load_model", "modelled_releases"), "cprfsm.model"),
    "Simulator": "cprfsm.simulator",
    **dict.fromkeys(
        ("EventStore", "InMemoryStore", "RecordedEvent", "SQLiteStore", "Snapshot"), "cprfsm.store"
    ),
}

__all__ = [
    "PHASES",
    "BlockDeviceChanged",
    "Command",
    "CommandFailed",
    "Configuration",
    "CorruptSection",
    "CorruptStateFile",
    "CorruptStoreError",
    "CprFsmError",
    "DamagedStreamError",
    "DuplicateEventIdError",
    "Event",
    "EventDecodeError",
    "EventStore",
    "Executor",
    "ExecutorError",
    "Exited",
    "ForeignStateFile",
    "ForeignStoreError",
    "IllegalTransition",
    "InMemoryStore",
    "InvalidHeader",
    "InvalidSection",
    "LogMismatchError",
    "MalformedEventError",
    "MemoryBackend",
    "MigrationSettings",
    "MissingSection",
    "ModelDivergence",
    "ModelError",
    "NewerEventVersionError",
    "NewerStoreError",
    "PortError",
    "QemuAbortPredicted",
    "QemuModel",
    "QmpEvent",
    "RamBlock",
    "Reason",
    "RecordedEvent",
    "Report",
    "ResourceError",
    "Rule",
    "SQLiteStore",
    "Simulator",
    "Snapshot",
    "StateFileError",
    "StoreError",
    "StoreFileError",
    "StoreNotFoundError",
    "Transferred",
    "TruncatedStateFile",
    "UnknownEventTypeError",
    "UnknownNameError",
    "UnsafePathError",
    "UnsupportedStateFile",
    "UsageError",
    "Verdict",
    "VersionConflict",
    "VirtualMachine",
    "VmDefinition",
    "VmState",
    "__version__",
    "check",
    "load_model",
    "modelled_releases",
    "phase_of",
    "rebuild",
    "replay",
]

if not TYPE_CHECKING:  # type checkers see the imports above; at run time, load on first use

    def __getattr__(name: str) -> object:
        """Load a public name's module the first time the name is used."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'cprfsm' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        """The module's names, the ones not loaded yet included."""
        return sorted({*globals(), *__all__})
