"""cprfsm: a model of how QEMU stops, saves, restarts and resumes a virtual machine.

The public surface is small: load a release's model, describe a configuration,
and ask :func:`check` what QEMU would do.
"""

from __future__ import annotations

from cprfsm.exceptions import (
    CprFsmError,
    IllegalTransition,
    ModelError,
    StoreError,
    UnknownNameError,
    UsageError,
    VersionConflict,
)
from cprfsm.legality import Configuration, MemoryBackend, Reason, Verdict, check
from cprfsm.model import QemuModel, Rule, load_model, modelled_releases

__version__ = "0.1.0.dev0"

__all__ = [
    "Configuration",
    "CprFsmError",
    "IllegalTransition",
    "MemoryBackend",
    "ModelError",
    "QemuModel",
    "Reason",
    "Rule",
    "StoreError",
    "UnknownNameError",
    "UsageError",
    "Verdict",
    "VersionConflict",
    "__version__",
    "check",
    "load_model",
    "modelled_releases",
]
