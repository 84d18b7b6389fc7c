"""Load QEMU models: versioned data about runstates, migration and legality rules.

The shipped model lives in ``models/qemu.yaml``; :func:`load_model` returns the
frozen view of it for one QEMU release.  A user's own model file in the same
format is loaded with ``load_model(version, path=...)``.
"""

from __future__ import annotations

import bisect
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from cprfsm._conditions import Vocabulary, compile_condition
from cprfsm._yamlnode import Node, read_model_text
from cprfsm.exceptions import UnknownNameError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cprfsm._conditions import Predicate

__all__ = [
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
]

#: The commands rules can refuse: QMP commands, and the process, host and guest
#: actions the lifecycle machine performs (start, quit, reboot-host, guest-*).
COMMANDS = (
    "migrate-set-parameters",
    "migrate-set-capabilities",
    "migrate",
    "migrate-incoming",
    "migrate-continue",
    "migrate_cancel",
    "cont",
    "stop",
    "system_wakeup",
    "start",
    "quit",
    "reboot-host",
    "upgrade-qemu",
    "debug-stop",
    "guest-suspend",
    "guest-reset",
    "guest-shutdown",
)

SCHEMA_VERSION = 1
# Release numbers have at most three digits a part, so every release is below _Span's
# open end (1000.0) and a huge number is refused instead of parsed.
_VERSION_RE = re.compile(r"v?([0-9]{1,3})\.([0-9]{1,3})(?:\.([0-9]{1,3}))?", re.ASCII)
_RELEASE_RE = re.compile(r"(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})", re.ASCII)
_PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)\}")
_FREE_PLACEHOLDERS = frozenset({"region", "aux_region"})


@attrs.frozen(kw_only=True)
class Mode:
    """A migration mode (the ``mode`` parameter) as one release implements it."""

    name: str
    cpr: bool
    stops_vm: str
    source: str


@attrs.frozen(kw_only=True)
class Parameter:
    """A migration parameter that legality rules read."""

    name: str
    values: tuple[str, ...] | None
    default: str


@attrs.frozen(kw_only=True)
class Transport:
    """A migration URI scheme and the channel properties rules test."""

    name: str
    seekable: bool
    multi_channel: bool
    streamable: bool


@attrs.frozen(kw_only=True)
class DeviceBlocker:
    """A migration blocker a device adds, for the modes it blocks; ``{node}`` names the node."""

    modes: frozenset[str]
    error: str
    source: str
    hint: str


@attrs.frozen(kw_only=True)
class Device:
    """A device kind that matters for legality, with the blockers it adds in this release."""

    name: str
    description: str
    blockers: tuple[DeviceBlocker, ...] = ()


@attrs.frozen(kw_only=True)
class MemoryBackendKind:
    """A guest RAM backend kind; ``object`` is the QOM type, None for plain ``-m``."""

    name: str
    object: str | None
    shareable: bool
    named_file: bool


@attrs.frozen(kw_only=True)
class HostFact:
    """A fact about the host or the QEMU build that some rules read."""

    name: str
    default: bool
    description: str


@attrs.frozen(kw_only=True)
class Rule:
    """One legality rule: when it applies, which command refuses, and QEMU's words.

    ``asynchronous`` rules fail a migration after the command succeeded, at
    ``fails_at`` (``setup``, before the VM stops, or ``completion``), or make it
    wait for good (``never``: QEMU stops the VM and rests in status ``device``,
    which is no refusal, so :func:`cprfsm.check` does not report it);
    ``aborts`` rules predict that QEMU aborts (its runstate table forbids a
    change its own code asks for).  ``capabilities`` are the capabilities the
    condition names; ``line`` is where the rule starts in its model file.
    """

    id: str
    commands: tuple[str, ...]
    asynchronous: bool
    aborts: bool
    fails_at: str
    error: str
    source: str
    hint: str
    line: int
    capabilities: frozenset[str]
    when: Predicate = attrs.field(eq=False, repr=False)


@attrs.frozen(kw_only=True)
class QemuModel:
    """The model of one QEMU release: every table and rule, frozen."""

    version: str
    path: str
    checked: str
    runstates: tuple[str, ...]
    live_runstates: frozenset[str]
    runstate_transitions: frozenset[tuple[str, str]]
    migration_statuses: tuple[str, ...]
    running_statuses: frozenset[str]
    outgoing_status_transitions: frozenset[tuple[str, str]]
    incoming_status_transitions: frozenset[tuple[str, str]]
    modes: tuple[Mode, ...]
    capabilities: tuple[str, ...]
    parameters: tuple[Parameter, ...]
    transports: tuple[Transport, ...]
    devices: tuple[Device, ...]
    memory_backends: tuple[MemoryBackendKind, ...]
    host_facts: tuple[HostFact, ...]
    rules: tuple[Rule, ...]

    def mode(self, name: str) -> Mode:
        """The mode called ``name``, or UnknownNameError listing this release's modes."""
        for mode in self.modes:
            if mode.name == name:
                return mode
        raise UnknownNameError(
            "mode", name, (m.name for m in self.modes), context=f"QEMU {self.version}"
        )

    def transport(self, name: str) -> Transport:
        """The transport called ``name``, or UnknownNameError."""
        for transport in self.transports:
            if transport.name == name:
                return transport
        raise UnknownNameError("URI scheme", name, (t.name for t in self.transports))

    def rules_for(self, command: str) -> tuple[Rule, ...]:
        """The rules that can refuse ``command``, in QEMU's evaluation order."""
        return tuple(rule for rule in self.rules if command in rule.commands)

    def may_change_status(self, side: str, old: str, new: str) -> bool:
        """Whether QEMU moves the ``outgoing`` or ``incoming`` migration status from old to new."""
        table = (
            self.outgoing_status_transitions
            if side == "outgoing"
            else self.incoming_status_transitions
        )
        return old == new or (old, new) in table

    def may_change_runstate(self, old: str, new: str) -> bool:
        """Whether QEMU's runstate table lets ``old`` become ``new`` (self-changes always can)."""
        return old == new or (old, new) in self.runstate_transitions


@functools.cache
def default_model_path() -> Path:
    """The shipped model file: inside the installed package, or the checkout's models/."""
    packaged = Path(__file__).with_name("models") / "qemu.yaml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "models" / "qemu.yaml"


def modelled_releases(path: str | Path | None = None) -> tuple[str, ...]:
    """The QEMU releases a model file covers, oldest first."""
    return _load_document(str(path or default_model_path())).releases


def load_model(version: str | None = None, *, path: str | Path | None = None) -> QemuModel:
    """Load the model of QEMU ``version`` (default: the newest modelled release).

    ``version`` may name a stable release (``10.0.2`` loads ``10.0``).
    Raises ModelError for a malformed file and UnknownNameError for a release
    the file does not model.  A model file is read as untrusted input: at most
    2 MiB, nested at most 64 deep and 100,000 nodes with aliases expanded, no
    control characters or non-core tags; breaking a limit is a ModelError
    naming the file and line.
    """
    document = _load_document(str(path or default_model_path()))
    return document.at(document.resolve(version))


# --- loading -----------------------------------------------------------------------


def _version_key(text: str) -> tuple[int, int]:
    match = _VERSION_RE.fullmatch(text)
    if match is None:
        raise ValueError(text)
    return int(match.group(1)), int(match.group(2))


@attrs.frozen
class _Span:
    """The releases an entry applies to: ``since`` inclusive, ``until`` exclusive."""

    since: tuple[int, int] = (0, 0)
    until: tuple[int, int] = (1000, 0)

    def covers(self, version: tuple[int, int]) -> bool:
        return self.since <= version < self.until

    def overlaps(self, other: _Span) -> bool:
        return self.since < other.until and other.since < self.until


def _span(fields: dict[str, Node]) -> _Span:
    bounds = {}
    for key in ("since", "until"):
        if key in fields:
            raw = fields[key].scalar(key)
            try:
                bounds[key] = _version_key(raw)
            except ValueError:
                fields[key].fail(f'{key} must be a QEMU release such as "9.0", not {_quoted(raw)}')
    span = _Span(**bounds)
    if span.since >= span.until:
        fields["until"].fail("until must be a later release than since")
    return span


def _quoted(text: str) -> str:
    """``text`` quoted for a message, cut to a readable length."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


class _Claims:
    """The release spans each name already holds: a duplicate check in O(log n) per entry."""

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[tuple[int, int], tuple[int, int]]]] = {}

    def claim(self, name: str, span: _Span) -> bool:
        """Record ``name`` for ``span``; False if it already holds an overlapping span."""
        # A name's spans are disjoint and sorted, so only the neighbours can overlap.
        spans = self._spans.setdefault(name, [])
        entry = (span.since, span.until)
        at = bisect.bisect_left(spans, entry)
        if at > 0 and spans[at - 1][1] > span.since:
            return False
        if at < len(spans) and spans[at][0] < span.until:
            return False
        spans.insert(at, entry)
        return True


@attrs.frozen(eq=False)
class _Document:
    """A parsed model file: every entry with the span of releases it applies to."""

    path: str
    releases: tuple[str, ...]
    checked: dict[str, str]
    runstates: tuple[tuple[_Span, str, bool], ...]
    transitions: tuple[tuple[_Span, str, str], ...]
    statuses: tuple[tuple[_Span, str], ...]
    running_statuses: frozenset[str]
    outgoing_edges: tuple[tuple[_Span, str, str], ...]
    incoming_edges: tuple[tuple[_Span, str, str], ...]
    modes: tuple[tuple[_Span, Mode], ...]
    capabilities: tuple[tuple[_Span, str], ...]
    parameters: tuple[tuple[_Span, Parameter], ...]
    transports: tuple[Transport, ...]
    devices: tuple[tuple[Device, tuple[tuple[_Span, DeviceBlocker], ...]], ...]
    memory_backends: tuple[MemoryBackendKind, ...]
    host_facts: tuple[HostFact, ...]
    rules: tuple[tuple[_Span, Rule], ...]

    def resolve(self, version: str | None) -> str:
        if version is None:
            return self.releases[-1]
        match = _VERSION_RE.fullmatch(version.strip())
        if match is not None:
            short = f"{match.group(1)}.{match.group(2)}"
            if short in self.releases:
                return short
        raise UnknownNameError("QEMU release", version, self.releases, context=self.path)

    @functools.cache  # noqa: B019 - a document lives as long as the process
    def at(self, version: str) -> QemuModel:
        key = _version_key(version)

        def live(entries: tuple[tuple[_Span, object], ...]) -> Iterator[object]:
            return (value for span, value in entries if span.covers(key))

        statuses = frozenset(str(v) for v in live(self.statuses))
        return QemuModel(
            version=version,
            path=self.path,
            checked=self.checked[version],
            runstates=tuple(dict.fromkeys(name for _, name, _ in self.runstates)),
            live_runstates=frozenset(
                name for span, name, live in self.runstates if live and span.covers(key)
            ),
            runstate_transitions=frozenset(
                (old, new) for span, old, new in self.transitions if span.covers(key)
            ),
            migration_statuses=tuple(str(v) for v in live(self.statuses)),
            running_statuses=self.running_statuses,
            outgoing_status_transitions=_live_edges(self.outgoing_edges, key, statuses),
            incoming_status_transitions=_live_edges(self.incoming_edges, key, statuses),
            modes=tuple(m for m in live(self.modes) if isinstance(m, Mode)),
            capabilities=tuple(str(c) for c in live(self.capabilities)),
            parameters=tuple(p for p in live(self.parameters) if isinstance(p, Parameter)),
            transports=self.transports,
            devices=tuple(
                attrs.evolve(device, blockers=tuple(b for span, b in blockers if span.covers(key)))
                for device, blockers in self.devices
            ),
            memory_backends=self.memory_backends,
            host_facts=self.host_facts,
            rules=tuple(r for r in live(self.rules) if isinstance(r, Rule)),
        )


def _live_edges(
    edges: tuple[tuple[_Span, str, str], ...], key: tuple[int, int], names: frozenset[str]
) -> frozenset[tuple[str, str]]:
    """The edges of one release between names that exist in it."""
    return frozenset(
        (old, new)
        for span, old, new in edges
        if span.covers(key) and old in names and new in names
    )


@functools.cache
def _load_document(path: str) -> _Document:
    return _parse_document(Node.parse(read_model_text(path), path))


_TOP_KEYS = frozenset(
    {
        "schema",
        "releases",
        "runstates",
        "runstate_transitions",
        "migration_statuses",
        "migration_status_transitions",
        "modes",
        "capabilities",
        "parameters",
        "transports",
        "devices",
        "memory_backends",
        "host_facts",
        "rules",
    }
)


def _parse_document(root: Node) -> _Document:
    top = root.items("the model", allowed=_TOP_KEYS)
    missing = sorted(_TOP_KEYS - top.keys())
    if missing:
        root.fail(f"the model lacks the section(s) {', '.join(missing)}")
    schema = top["schema"].scalar("schema")
    if schema != str(SCHEMA_VERSION):
        top["schema"].fail(
            f"model schema {schema} is not supported; this cprfsm reads schema {SCHEMA_VERSION}"
        )
    releases, checked = _parse_releases(top["releases"])
    runstates = _parse_runstates(top["runstates"])
    runstate_names = frozenset(name for _, name, _ in runstates)
    statuses, running = _parse_statuses(top["migration_statuses"])
    status_edges = _parse_status_transitions(
        top["migration_status_transitions"], frozenset(name for _, name in statuses)
    )
    capabilities = tuple(_versioned_names(top["capabilities"], "capability"))
    parameters = _parse_parameters(top["parameters"])
    transports = _parse_transports(top["transports"])
    modes = _parse_modes(top["modes"])
    devices = _parse_devices(top["devices"], frozenset(mode.name for _, mode in modes))
    memory = _parse_memory(top["memory_backends"])
    host_facts = _parse_host_facts(top["host_facts"])
    vocab = Vocabulary(
        capabilities=frozenset(name for _, name in capabilities),
        modes=frozenset(mode.name for _, mode in modes),
        runstates=runstate_names,
        devices=frozenset(d.name for d, _ in devices),
        parameters={p.name: (frozenset(p.values) if p.values else None) for _, p in parameters},
        host_facts=frozenset(h.name for h in host_facts),
        transports=frozenset(t.name for t in transports),
        memory_backends=frozenset(m.name for m in memory),
    )
    return _Document(
        path=root.path,
        releases=releases,
        checked=checked,
        runstates=runstates,
        transitions=_parse_transitions(top["runstate_transitions"], runstate_names),
        statuses=statuses,
        running_statuses=running,
        outgoing_edges=status_edges["outgoing"],
        incoming_edges=status_edges["incoming"],
        modes=modes,
        capabilities=capabilities,
        parameters=parameters,
        transports=transports,
        devices=devices,
        memory_backends=memory,
        host_facts=host_facts,
        rules=_parse_rules(top["rules"], vocab),
    )


def _records(node: Node, what: str, keys: frozenset[str]) -> Iterator[dict[str, Node]]:
    """Each element of a list of mappings, with required keys checked."""
    for element in node.elements(f"the list of {what}s"):
        fields = element.items(what, allowed=keys | {"since", "until", "source"})
        missing = sorted(keys - fields.keys())
        if missing:
            element.fail(f"{what} lacks {', '.join(missing)}")
        yield fields


def _unique(fields: dict[str, Node], what: str, seen: set[str]) -> str:
    """The entry's name, which no earlier entry of the list may have."""
    name = fields["name"].name("name")
    if name in seen:
        fields["name"].fail(f"{what} {name!r} is listed twice")
    seen.add(name)
    return name


def _section(node: Node, what: str, body: str = "values") -> tuple[Node, str]:
    fields = node.items(what, allowed=frozenset({"source", body}))
    source = fields["source"].text("source") if "source" in fields else ""
    if body not in fields:
        node.fail(f"{what} needs {body}")
    return fields[body], source


def _parse_host_facts(node: Node) -> tuple[HostFact, ...]:
    seen: set[str] = set()
    return tuple(
        HostFact(
            name=_unique(f, "host fact", seen),
            default=f["default"].flag("default"),
            description=f["description"].text("description"),
        )
        for f in _records(node, "a host fact", frozenset({"name", "default", "description"}))
    )


def _parse_releases(node: Node) -> tuple[tuple[str, ...], dict[str, str]]:
    releases: list[str] = []
    checked: dict[str, str] = {}
    for fields in _records(node, "a release", frozenset({"version", "checked"})):
        version = fields["version"].text("version")
        if not _RELEASE_RE.fullmatch(version):
            fields["version"].fail(f'a release must look like "10.0", not {_quoted(version)}')
        if version in checked:
            fields["version"].fail(f"release {version} is listed twice")
        releases.append(version)
        checked[version] = fields["checked"].text("checked")
    if not releases:
        node.fail("the model must list at least one release")
    return tuple(sorted(releases, key=_version_key)), checked


def _parse_runstates(node: Node) -> tuple[tuple[_Span, str, bool], ...]:
    body, _ = _section(node, "runstates")
    result: list[tuple[_Span, str, bool]] = []
    claims = _Claims()
    for fields in _records(body, "a runstate", frozenset({"name", "live"})):
        name = fields["name"].name("name")
        span = _span(fields)
        if not claims.claim(name, span):
            fields["name"].fail(f"runstate {name!r} is listed twice for the same releases")
        result.append((span, name, fields["live"].flag("live")))
    return tuple(result)


def _parse_transitions(
    node: Node, runstates: frozenset[str]
) -> tuple[tuple[_Span, str, str], ...]:
    body, _ = _section(node, "runstate_transitions", "from")
    return _edges(body, runstates, "runstate")


def _edges(body: Node, known: frozenset[str], kind: str) -> tuple[tuple[_Span, str, str], ...]:
    """A ``from: [to, {to:, since:, until:}, ...]`` table, every name checked."""
    result: list[tuple[_Span, str, str]] = []
    for old, targets in body.items(f"the {kind} table").items():
        if old not in known:
            body.fail(f"the {kind} table names an unknown {kind} {old!r}")
        for target in targets.elements(f"the targets of {old}"):
            if target.is_mapping():
                fields = target.items(
                    "a versioned target", allowed=frozenset({"to", "since", "until"})
                )
                if "to" not in fields:
                    target.fail("a versioned target needs to:")
                new, span, where = fields["to"].text("to"), _span(fields), fields["to"]
            else:
                new, span, where = target.text(f"a target {kind}"), _Span(), target
            if new not in known:
                where.fail(f"unknown {kind} {new!r} in the targets of {old}")
            if new == old:
                where.fail(
                    f"{old} -> {old} needs no entry: a change to the same {kind} is a no-op"
                )
            result.append((span, old, new))
    return tuple(result)


def _parse_status_transitions(
    node: Node, statuses: frozenset[str]
) -> dict[str, tuple[tuple[_Span, str, str], ...]]:
    fields = node.items(
        "migration_status_transitions", allowed=frozenset({"source", "outgoing", "incoming"})
    )
    for side in ("outgoing", "incoming"):
        if side not in fields:
            node.fail(f"migration_status_transitions needs {side}")
    return {
        side: _edges(fields[side], statuses, "migration status")
        for side in ("outgoing", "incoming")
    }


def _parse_statuses(node: Node) -> tuple[tuple[tuple[_Span, str], ...], frozenset[str]]:
    fields = node.items("migration_statuses", allowed=frozenset({"source", "values", "running"}))
    for key in ("values", "running"):
        if key not in fields:
            node.fail(f"migration_statuses needs {key}")
    statuses = tuple(_versioned(fields["values"], "migration status"))
    known = {name for _, name in statuses}
    running = set()
    for name, child in fields["running"].texts("running"):
        if name not in known:
            child.fail(f"unknown migration status {name!r}")
        running.add(name)
    return statuses, frozenset(running)


def _versioned_names(node: Node, what: str) -> Iterator[tuple[_Span, str]]:
    body, _ = _section(node, f"{what} values")
    return _versioned(body, what)


def _versioned(body: Node, what: str) -> Iterator[tuple[_Span, str]]:
    """The names of a list of ``{name:, since:, until:}``, none twice for one release."""
    claims = _Claims()
    for fields in _records(body, f"a {what}", frozenset({"name"})):
        name = fields["name"].name("name")
        span = _span(fields)
        if not claims.claim(name, span):
            fields["name"].fail(f"{what} {name!r} is listed twice for the same releases")
        yield span, name


def _parse_modes(node: Node) -> tuple[tuple[_Span, Mode], ...]:
    body, default_source = _section(node, "modes")
    result: list[tuple[_Span, Mode]] = []
    claims = _Claims()
    for fields in _records(body, "a mode", frozenset({"name", "cpr", "stops_vm"})):
        stops = fields["stops_vm"].text("stops_vm")
        if stops not in {"at-connect", "at-switchover"}:
            fields["stops_vm"].fail("stops_vm must be at-connect or at-switchover")
        mode = Mode(
            name=fields["name"].name("name"),
            cpr=fields["cpr"].flag("cpr"),
            stops_vm=stops,
            source=fields["source"].text("source") if "source" in fields else default_source,
        )
        span = _span(fields)
        if not claims.claim(mode.name, span):
            fields["name"].fail(f"mode {mode.name!r} is listed twice for the same releases")
        result.append((span, mode))
    return tuple(result)


def _parse_devices(
    node: Node, modes: frozenset[str]
) -> tuple[tuple[Device, tuple[tuple[_Span, DeviceBlocker], ...]], ...]:
    result = []
    seen: set[str] = set()
    blocker_keys = frozenset({"modes", "error", "source", "hint"})
    for fields in _records(node, "a device", frozenset({"name", "description", "blockers"})):
        name = _unique(fields, "device", seen)
        blockers = []
        for blocker in _records(fields["blockers"], "a device blocker", blocker_keys):
            names = set()
            for mode, child in blocker["modes"].texts("modes"):
                if mode not in modes:
                    child.fail(f"unknown mode {mode!r}; known: {', '.join(sorted(modes))}")
                names.add(mode)
            for key in ("error", "hint"):
                for placeholder in _PLACEHOLDER_RE.findall(blocker[key].text(key)):
                    if placeholder != "node":
                        blocker[key].fail(
                            f"a device blocker can only use {{node}}, not {{{placeholder}}}"
                        )
            entry = DeviceBlocker(
                modes=frozenset(names),
                error=blocker["error"].text("error"),
                source=blocker["source"].text("source"),
                hint=blocker["hint"].text("hint"),
            )
            blockers.append((_span(blocker), entry))
        device = Device(name=name, description=fields["description"].text("description"))
        result.append((device, tuple(blockers)))
    return tuple(result)


def _parse_parameters(node: Node) -> tuple[tuple[_Span, Parameter], ...]:
    body, _ = _section(node, "parameters")
    result: list[tuple[_Span, Parameter]] = []
    claims = _Claims()
    for fields in _records(body, "a parameter", frozenset({"name", "values", "default"})):
        name = fields["name"].name("name")
        span = _span(fields)
        if not claims.claim(name, span):
            fields["name"].fail(f"parameter {name!r} is listed twice for the same releases")
        values_node = fields["values"]
        values = (
            None
            if not values_node.is_sequence() and values_node.scalar("values") == "any"
            else tuple(v.scalar("a value").lower() for v in values_node.elements("values"))
        )
        default = fields["default"].scalar("default").lower()
        if values is not None and default not in values:
            fields["default"].fail(f"the default {default!r} is not among the values")
        result.append((span, Parameter(name=name, values=values, default=default)))
    return tuple(result)


def _parse_transports(node: Node) -> tuple[Transport, ...]:
    body, _ = _section(node, "transports")
    keys = frozenset({"name", "seekable", "multi_channel", "streamable"})
    seen: set[str] = set()
    return tuple(
        Transport(
            name=_unique(f, "transport", seen),
            seekable=f["seekable"].flag("seekable"),
            multi_channel=f["multi_channel"].flag("multi_channel"),
            streamable=f["streamable"].flag("streamable"),
        )
        for f in _records(body, "a transport", keys)
    )


def _parse_memory(node: Node) -> tuple[MemoryBackendKind, ...]:
    body, _ = _section(node, "memory_backends")
    keys = frozenset({"name", "object", "shareable", "named_file"})
    result = []
    seen: set[tuple[str, str | None]] = set()
    for f in _records(body, "a memory backend", keys):
        name = f["name"].name("name")
        obj = f["object"].scalar("object")
        kind = (name, None if obj in {"null", "~", ""} else f["object"].name("object"))
        if kind in seen:
            f["name"].fail(f"memory backend {name!r} with object {obj} is listed twice")
        seen.add(kind)
        result.append(
            MemoryBackendKind(
                name=name,
                object=kind[1],
                shareable=f["shareable"].flag("shareable"),
                named_file=f["named_file"].flag("named_file"),
            )
        )
    return tuple(result)


_RULE_KEYS = frozenset({"id", "command", "when", "error", "source", "hint"})


def _fails_at(fields: dict[str, Node]) -> str:
    if "fails_at" not in fields:
        return "setup"
    if "asynchronous" not in fields or not fields["asynchronous"].flag("asynchronous"):
        fields["fails_at"].fail("fails_at only applies to an asynchronous rule")
    value = fields["fails_at"].text("fails_at")
    if value not in {"setup", "completion", "never"}:
        fields["fails_at"].fail(f"fails_at must be setup, completion or never, not {value!r}")
    return value


def _parse_rules(node: Node, vocab: Vocabulary) -> tuple[tuple[_Span, Rule], ...]:
    result: list[tuple[_Span, Rule]] = []
    claims = _Claims()
    for element in node.elements("rules"):
        fields = element.items(
            "a rule", allowed=_RULE_KEYS | {"since", "until", "asynchronous", "aborts", "fails_at"}
        )
        missing = sorted(_RULE_KEYS - fields.keys())
        if missing:
            element.fail(f"the rule lacks {', '.join(missing)}")
        rule_id = fields["id"].name("id")
        commands = []
        for command, child in fields["command"].texts("command"):
            if command not in COMMANDS:
                child.fail(f"unknown command {command!r}; rules can refuse {', '.join(COMMANDS)}")
            commands.append(command)
        mentions: set[str] = set()
        when, binds = compile_condition(fields["when"], vocab, mentions)
        for key in ("error", "hint", "source"):
            for placeholder in _PLACEHOLDER_RE.findall(fields[key].text(key)):
                if placeholder not in binds | _FREE_PLACEHOLDERS:
                    fields[key].fail(f"{{{placeholder}}} is not bound by this rule's condition")
        span = _span(fields)
        if not claims.claim(rule_id, span):
            fields["id"].fail(f"rule {rule_id!r} is defined twice for the same releases")
        rule = Rule(
            id=rule_id,
            commands=tuple(commands),
            asynchronous=fields["asynchronous"].flag("asynchronous")
            if "asynchronous" in fields
            else False,
            aborts=fields["aborts"].flag("aborts") if "aborts" in fields else False,
            fails_at=_fails_at(fields),
            error=fields["error"].text("error"),
            source=fields["source"].text("source"),
            hint=fields["hint"].text("hint"),
            line=element.line,
            capabilities=frozenset(mentions),
            when=when,
        )
        result.append((span, rule))
    return tuple(result)
