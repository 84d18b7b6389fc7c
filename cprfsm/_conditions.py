"""Compile the ``when:`` conditions of model rules into predicates over request facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from cprfsm._yamlnode import Node

Bindings = dict[str, str]
Predicate = Callable[["Facts"], Bindings | None]


@attrs.frozen(kw_only=True)
class Facts:
    """Everything a rule may look at, resolved against one model release."""

    mode: str
    capabilities: frozenset[str]
    runstate: str
    suspended: bool
    migration_running: bool
    migration_status: str
    process: str
    incoming: str
    transport: Mapping[str, bool | str]
    cpr_channel: bool
    memory: Mapping[str, bool | str]
    aux_ram_share: bool
    devices: tuple[tuple[str, str], ...]
    parameters: Mapping[str, str]
    parameter_defaults: Mapping[str, str]
    host: Mapping[str, bool]
    region: str
    aux_region: str
    blocker: Mapping[str, str] | None
    live_runstates: frozenset[str]
    runstate_table: frozenset[tuple[str, str]]


@attrs.frozen(kw_only=True)
class Vocabulary:
    """The names a condition may mention, for validating a model file."""

    capabilities: frozenset[str]
    modes: frozenset[str]
    runstates: frozenset[str]
    devices: frozenset[str]
    parameters: Mapping[str, frozenset[str] | None]
    host_facts: frozenset[str]
    transports: frozenset[str]
    memory_backends: frozenset[str]


_TRANSPORT_FLAGS = frozenset({"seekable", "multi_channel", "streamable"})
_MEMORY_FLAGS = frozenset({"shareable", "named_file", "share"})
_PROCESS = frozenset({"running", "absent"})
_INCOMING = frozenset({"none", "deferred", "started", "completed", "wedged"})
_MIGRATION = frozenset({"running", "idle"})
_KEYS = frozenset(
    {
        "mode",
        "capability",
        "all",
        "none",
        "runstate",
        "runstate_not",
        "runstate_cannot_become",
        "suspended",
        "migration",
        "migration_status_not",
        "process",
        "incoming",
        "transport",
        "cpr_channel",
        "memory",
        "aux_ram_share",
        "devices",
        "blocked",
        "parameter",
        "parameter_set",
        "host",
        "any",
        "not",
    }
)


def compile_condition(
    node: Node, vocab: Vocabulary, mentions: set[str]
) -> tuple[Predicate, frozenset[str]]:
    """Compile a ``when:`` mapping; return the predicate and the placeholders it binds.

    Every capability the condition names is added to ``mentions``.
    """
    parts: list[Predicate] = []
    binds: set[str] = set()
    for key, value in node.items("a rule condition", allowed=_KEYS).items():
        if key in {"capability", "all", "none"}:
            mentions.update(name for name, _ in value.texts(key))
        predicate, bound = _compile_key(key, value, vocab, mentions)
        parts.append(predicate)
        binds |= bound
    if not parts:
        node.fail("a rule condition must test at least one thing")
    return _conjunction(parts), frozenset(binds)


def _compile_key(  # noqa: C901, PLR0911, PLR0912 - one branch per condition keyword
    key: str, value: Node, vocab: Vocabulary, mentions: set[str]
) -> tuple[Predicate, frozenset[str]]:
    if key == "mode":
        modes = _names(value, "mode", vocab.modes)
        return (lambda f: {} if f.mode in modes else None), frozenset()
    if key == "capability":
        ordered = tuple(_names_ordered(value, "capability", vocab.capabilities))
        return _first_capability(ordered), frozenset({"capability"})
    if key == "all":
        needed = _names(value, "capability", vocab.capabilities)
        return (lambda f: {} if needed <= f.capabilities else None), frozenset()
    if key == "none":
        absent = _names(value, "capability", vocab.capabilities)
        return (lambda f: None if absent & f.capabilities else {}), frozenset()
    if key == "runstate":
        states = _names(value, "runstate", vocab.runstates)
        return (lambda f: {} if f.runstate in states else None), frozenset()
    if key == "runstate_not":
        others = _names(value, "runstate", vocab.runstates)
        return (lambda f: None if f.runstate in others else {"runstate": f.runstate}), frozenset(
            {"runstate"}
        )
    if key == "runstate_cannot_become":
        target = _choice(value, "runstate", vocab.runstates)
        return _cannot_become(target), frozenset({"runstate"})
    if key == "suspended":
        want = value.flag("suspended")
        return (lambda f: {} if f.suspended == want else None), frozenset()
    if key == "migration":
        status = _choice(value, "migration", _MIGRATION)
        running = status == "running"
        return (lambda f: {} if f.migration_running == running else None), frozenset()
    if key == "migration_status_not":
        statuses = frozenset(name for name, _ in value.texts(key))
        return (
            lambda f: None if f.migration_status in statuses else {"status": f.migration_status}
        ), frozenset({"status"})
    if key == "process":
        process = _choice(value, "process", _PROCESS)
        return (lambda f: {} if f.process == process else None), frozenset()
    if key == "incoming":
        states = _names(value, "incoming state", _INCOMING)
        return (lambda f: {} if f.incoming in states else None), frozenset()
    if key in {"transport", "memory"}:
        return _attribute_test(key, value, vocab), frozenset()
    if key in {"cpr_channel", "aux_ram_share"}:
        want = value.flag(key)
        return (lambda f: {} if getattr(f, key) == want else None), frozenset()
    if key == "devices":
        ordered = tuple(_names_ordered(value, "device", vocab.devices))
        return _first_device(ordered), frozenset({"device", "node"})
    if key == "blocked":
        want = value.flag("blocked")
        return (
            lambda f: (
                (dict(f.blocker) if f.blocker else {}) if (f.blocker is not None) == want else None
            )
        ), frozenset({"blocker", "blocker_hint", "blocker_source"} if want else ())
    if key == "parameter":
        return _parameter_values(value, vocab), frozenset()
    if key == "parameter_set":
        names = _names(value, "parameter", frozenset(vocab.parameters))
        return _parameter_set(names), frozenset()
    if key == "host":
        return _host(value, vocab), frozenset()
    if key == "any":
        return _any(value, vocab, mentions)
    predicate, _ = compile_condition(value, vocab, mentions)
    return (lambda f: {} if predicate(f) is None else None), frozenset()


def _conjunction(parts: list[Predicate]) -> Predicate:
    def predicate(facts: Facts) -> Bindings | None:
        bindings: Bindings = {}
        for part in parts:
            found = part(facts)
            if found is None:
                return None
            bindings.update(found)
        return bindings

    return predicate


def _any(node: Node, vocab: Vocabulary, mentions: set[str]) -> tuple[Predicate, frozenset[str]]:
    options = [compile_condition(child, vocab, mentions) for child in node.elements("any")]
    if not options:
        node.fail("any must list at least one condition")
    # A placeholder is only safe to use if every alternative binds it.
    binds = frozenset.intersection(*(bound for _, bound in options))

    def predicate(facts: Facts) -> Bindings | None:
        for option, _ in options:
            found = option(facts)
            if found is not None:
                return found
        return None

    return predicate, binds


def _cannot_become(target: str) -> Predicate:
    """QEMU's runstate_set(target) on a stopped VM: true where its table forbids the change."""

    def predicate(facts: Facts) -> Bindings | None:
        old = facts.runstate
        if old in facts.live_runstates or old == target:
            return None
        return None if (old, target) in facts.runstate_table else {"runstate": old}

    return predicate


def _first_capability(ordered: tuple[str, ...]) -> Predicate:
    def predicate(facts: Facts) -> Bindings | None:
        for name in ordered:
            if name in facts.capabilities:
                return {"capability": name}
        return None

    return predicate


def _first_device(ordered: tuple[str, ...]) -> Predicate:
    def predicate(facts: Facts) -> Bindings | None:
        for name in ordered:
            for device, node in facts.devices:
                if device == name:
                    return {"device": name, "node": node}
        return None

    return predicate


def _attribute_test(key: str, node: Node, vocab: Vocabulary) -> Predicate:
    flags = _TRANSPORT_FLAGS if key == "transport" else _MEMORY_FLAGS
    known = vocab.transports if key == "transport" else vocab.memory_backends
    tests: list[tuple[str, frozenset[str] | bool]] = []
    for name, value in node.items(f"the {key} test", allowed=flags | {"name"}).items():
        if name == "name":
            tests.append((name, _names(value, key, known)))
        else:
            tests.append((name, value.flag(name)))

    def predicate(facts: Facts) -> Bindings | None:
        attributes = getattr(facts, key)
        for name, wanted in tests:
            actual = attributes[name]
            ok = actual in wanted if isinstance(wanted, frozenset) else actual == wanted
            if not ok:
                return None
        return {}

    return predicate


def _parameter_values(node: Node, vocab: Vocabulary) -> Predicate:
    wanted: dict[str, frozenset[str]] = {}
    for name, values in node.items("the parameter test").items():
        if name not in vocab.parameters:
            values.fail(f"unknown parameter {name!r}")
        allowed = vocab.parameters[name]
        spelled = frozenset(v for v, _ in values.texts(f"values of {name}"))
        if allowed is not None and not spelled <= allowed:
            values.fail(f"{name} has no value {min(spelled - allowed)!r}")
        wanted[name] = spelled

    def predicate(facts: Facts) -> Bindings | None:
        for name, values in wanted.items():
            if facts.parameters.get(name, facts.parameter_defaults[name]) not in values:
                return None
        return {}

    return predicate


def _parameter_set(names: frozenset[str]) -> Predicate:
    def predicate(facts: Facts) -> Bindings | None:
        for name in names:
            if facts.parameters.get(name, facts.parameter_defaults[name]) not in {
                "",
                facts.parameter_defaults[name],
            }:
                return {}
        return None

    return predicate


def _host(node: Node, vocab: Vocabulary) -> Predicate:
    wanted: dict[str, bool] = {}
    for name, value in node.items("the host test").items():
        if name not in vocab.host_facts:
            value.fail(f"unknown host fact {name!r}; known: {', '.join(sorted(vocab.host_facts))}")
        wanted[name] = value.flag(name)

    def predicate(facts: Facts) -> Bindings | None:
        return {} if all(facts.host[k] == v for k, v in wanted.items()) else None

    return predicate


def _names_ordered(node: Node, kind: str, known: frozenset[str]) -> list[str]:
    names = []
    for name, child in node.texts(f"the {kind} list"):
        if name not in known:
            child.fail(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        names.append(name)
    return names


def _names(node: Node, kind: str, known: frozenset[str]) -> frozenset[str]:
    return frozenset(_names_ordered(node, kind, known))


def _choice(node: Node, kind: str, known: frozenset[str]) -> str:
    value = node.text(kind)
    if value not in known:
        node.fail(f"{kind} must be one of {', '.join(sorted(known))}, not {value!r}")
    return value
