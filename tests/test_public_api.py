"""The public API, listed: a change to it is deliberate, and it stays one coherent surface."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cprfsm
from cprfsm.exceptions import CprFsmError

PACKAGE = Path(cprfsm.__file__).parent

# Each documented public module and its __all__.  Change this together with the API, the
# reference (docs/reference.md) and the changelog.
PUBLIC_API: dict[str, tuple[str, ...]] = {
    "cprfsm": (
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
    ),
    "cprfsm.demo": (
        "BACKENDS",
        "MAX_RAM",
        "DemoOptions",
        "DemoReport",
        "TimelineEntry",
        "check_resources",
        "default_progress",
        "parse_size",
        "qemu_backend_missing",
        "resolve_backend",
        "run_demo",
        "state_file_path",
    ),
    "cprfsm.events": (
        "Event",
        "EventRegistry",
        "RecordedEvent",
        "Snapshot",
        "Upcaster",
        "default_registry",
        "event",
        "new_event_id",
        "upcaster",
    ),
    "cprfsm.exceptions": (
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
    ),
    "cprfsm.executor": (
        "COMMANDS",
        "Command",
        "Executor",
        "Exited",
        "MigrationSettings",
        "QmpEvent",
        "RamBlock",
        "Report",
        "Transferred",
        "VmDefinition",
        "ram_blocks",
    ),
    "cprfsm.hazards": (
        "Hazard",
        "hazards_of",
    ),
    "cprfsm.legality": (
        "INCOMING_STATES",
        "Configuration",
        "MemoryBackend",
        "Reason",
        "Verdict",
        "check",
    ),
    "cprfsm.lifecycle": (
        "PHASES",
        "VmState",
        "phase_diagram",
        "phase_of",
        "rebuild",
        "replay",
    ),
    "cprfsm.machine": ("VirtualMachine",),
    "cprfsm.matrix": (
        "LegalityMatrix",
        "legality_matrix",
    ),
    "cprfsm.model": (
        "COMMANDS",
        "Device",
        "DeviceBlocker",
        "HostFact",
        "MemoryBackendKind",
        "Mode",
        "Parameter",
        "QemuModel",
        "Rule",
        "Transport",
        "default_model_path",
        "load_model",
        "modelled_releases",
    ),
    "cprfsm.ports": (
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
    ),
    "cprfsm.qmp": (
        "MARKER_ADDRESS",
        "MARKER_LENGTH",
        "MARKER_MAGIC",
        "SETTLED_STATUSES",
        "Guest",
        "QmpExecutor",
        "boot_sector",
        "command_line",
        "default_qemu",
        "read_marker",
        "write_boot_image",
    ),
    "cprfsm.simulator": (
        "IMAGE_FORMATS",
        "SimulatedQemu",
        "Simulator",
        "on_volatile_filesystem",
    ),
    "cprfsm.statefile": (
        "MACHINE",
        "MAGIC",
        "MAX_HEADER_BYTES",
        "MAX_HEADER_DEPTH",
        "MAX_SECTIONS",
        "MAX_SECTION_NAME",
        "QEMU_MODES",
        "QEMU_RUNSTATES",
        "VERSION",
        "NameCheck",
        "StateFileReader",
        "StateFileWriter",
        "check_header",
    ),
    "cprfsm.store": (
        "EventStore",
        "InMemoryStore",
        "RecordedEvent",
        "SQLiteStore",
        "Snapshot",
    ),
    "cprfsm.testing": (
        "DEFAULT_URIS",
        "RecordingPorts",
        "capture_transitions",
        "command_sequences",
        "commands",
        "configurations",
    ),
    "cprfsm.testing.contract": ("EventStoreContract",),
    "cprfsm.vm_events": (
        "AutostartChanged",
        "CapabilitiesSet",
        "DeviceStateLoaded",
        "DeviceStateSaved",
        "GuestDataLost",
        "GuestReset",
        "GuestSuspended",
        "GuestWokeUp",
        "HazardReported",
        "HostRebooted",
        "IncomingStarted",
        "MigrationStarted",
        "MigrationStatusReported",
        "ModelDiverged",
        "OperationFailed",
        "OperationStarted",
        "ParametersSet",
        "QemuExited",
        "QemuObserved",
        "QemuStarted",
        "QemuUpgraded",
        "RamLoaded",
        "RamSaved",
        "RunstateSet",
        "StateFileWritten",
        "VmResumed",
        "VmStopped",
    ),
    "cprfsm.watch": (
        "connect",
        "migration_settings",
        "watch",
    ),
}

# Private names still imported across modules, and by whom.  The codec split of
# events.py (issue 10, item 1) removes these; delete each entry as it goes.
KNOWN_PRIVATE_IMPORTS = {
    ("cprfsm/store.py", "cprfsm.events"),
    ("cprfsm/_store_sqlite.py", "cprfsm.events"),
    ("cprfsm/testing/contract.py", "cprfsm.events"),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_API))
def test_public_api_is_as_listed(name: str) -> None:
    """Each public module exports exactly the names listed here, each of them defined."""
    module = importlib.import_module(name)
    exported = set(module.__all__)
    listed = set(PUBLIC_API[name])
    assert exported == listed, (
        f"{name}: added {sorted(exported - listed)}, removed {sorted(listed - exported)}"
    )
    assert len(module.__all__) == len(exported), f"{name}.__all__ repeats a name"
    for attribute in module.__all__:
        assert hasattr(module, attribute), f"{name}.{attribute} is listed but missing"


def test_top_level_names_are_the_objects_of_their_home_modules() -> None:
    """``cprfsm.X`` is the very object its module defines, so isinstance and except agree."""
    homes = [importlib.import_module(name) for name in PUBLIC_API if name != "cprfsm"]
    for name in cprfsm.__all__:
        value = getattr(cprfsm, name)
        if name == "__version__":
            continue
        assert any(getattr(home, name, None) is value for home in homes), name


def test_dir_shows_names_not_loaded_yet() -> None:
    """``dir(cprfsm)`` lists every public name, loaded or not, for completion in notebooks."""
    assert set(cprfsm.__all__) <= set(dir(cprfsm))


def test_unknown_top_level_name_is_an_attribute_error() -> None:
    """A name cprfsm does not export raises AttributeError naming it."""
    with pytest.raises(AttributeError, match="no attribute 'VirtualMachin'"):
        _ = cprfsm.VirtualMachin  # type: ignore[attr-defined]


def test_every_public_exception_is_in_the_one_tree() -> None:
    """Exceptions of public modules are defined in cprfsm.exceptions, under CprFsmError."""
    exceptions = importlib.import_module("cprfsm.exceptions")
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), CprFsmError), name
    assert set(exceptions.__all__) <= set(cprfsm.__all__)
    for module_name in PUBLIC_API:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.startswith("cprfsm")
                and not name.startswith("_")
            ):
                assert value.__module__ == "cprfsm.exceptions", f"{module_name}.{name}"


def test_exceptions_import_nothing_of_cprfsm() -> None:
    """cprfsm.exceptions is the ground floor: importing it loads no other cprfsm module."""
    code = "import sys, cprfsm.exceptions; print(sorted(m for m in sys.modules if 'cprfsm' in m))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['cprfsm', 'cprfsm.exceptions']"


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


_PRIVATE_TARGET = re.compile(r"cprfsm(?:\.[a-z]\w*)+\.(_[a-z]\w*)")


def _private_uses(path: Path) -> set[tuple[str, str]]:
    """(module, private name) pairs the source of ``path`` reaches into."""
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cprfsm"):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if _is_module(dotted):
                    modules[alias.asname or alias.name] = dotted
                elif _private(alias.name):
                    found.add((str(node.module), alias.name))
    for node in ast.walk(tree):
        found.update(_reach(node, modules))
    return found


def _reach(node: ast.AST, modules: dict[str, str]) -> set[tuple[str, str]]:
    """A private name of a cprfsm module that ``node`` uses: attribute, setattr or dotted path."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id in modules and _private(node.attr):
            return {(modules[node.value.id], node.attr)}
    elif isinstance(node, ast.Call) and len(node.args) >= 2:
        # Also catches monkeypatch.setattr with a module and a private name.
        target, name = node.args[:2]
        if (
            isinstance(target, ast.Name)
            and target.id in modules
            and isinstance(name, ast.Constant)
            and isinstance(name.value, str)
            and _private(name.value)
        ):
            return {(modules[target.id], name.value)}
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = _PRIVATE_TARGET.fullmatch(node.value)
        if match:
            return {(node.value.rsplit(".", 1)[0], match.group(1))}
    return set()


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """Modules use each other's public names only; private modules are fine, their ``_x`` not."""
    seen: set[tuple[str, str]] = set()
    unexpected = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        for module, name in sorted(_private_uses(path)):
            if (where, module) in KNOWN_PRIVATE_IMPORTS:
                seen.add((where, module))
            else:
                unexpected.append(f"{where} uses {module}.{name}")
    assert unexpected == []
    assert seen == KNOWN_PRIVATE_IMPORTS, "remove the entries that no longer occur"


def test_reference_shows_every_exception_in_the_tree() -> None:
    """docs/reference.md draws the exception tree with every exception of cprfsm.exceptions."""
    reference = (PACKAGE.parent / "docs" / "reference.md").read_text()
    tree = reference.split("## The exception tree", 1)[1].split("```", 2)[1]
    exceptions = importlib.import_module("cprfsm.exceptions")
    assert set(re.findall(r"\b([A-Z]\w+)\b", tree)) >= set(exceptions.__all__)
