"""Decide whether QEMU would accept a request, and if not, exactly what it would say.

:func:`check` walks the QMP sequence a user sends (``migrate-set-parameters``,
``migrate-set-capabilities``, then the command) through one release's rules and
returns a frozen :class:`Verdict`.  It is pure: nothing is started or changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from cprfsm._conditions import Facts
from cprfsm._files import check_name
from cprfsm._options import parse_device, parse_switch, split_options
from cprfsm.exceptions import UnknownNameError, UsageError
from cprfsm.model import COMMANDS, Device, QemuModel, Rule, load_model

__all__ = [
    "INCOMING_STATES",
    "Configuration",
    "MemoryBackend",
    "Reason",
    "Verdict",
    "check",
]

INCOMING_STATES = ("none", "deferred", "started", "completed", "wedged")
"""What a :class:`Configuration`'s ``incoming`` may be: ``-incoming`` not given, waiting for
``migrate-incoming`` (deferred), an incoming migration in progress (started), completed, or
wedged (``migrate-incoming`` failed to open its channel; QEMU stays in setup and refuses
another one)."""
# RAM region names of the pc machine with SeaBIOS: plain `-m` memory, and the
# last implicit RAM block QEMU creates (so its CPR blocker is the newest).
_DEFAULT_RAM_REGION = "pc.ram"
_LAST_AUX_REGION = "/rom@etc/acpi/rsdp"


def _all_text(values: Iterable[object]) -> bool:
    # A loop, not all() over a generator: three times faster for the usual one or two names.
    for value in values:  # noqa: SIM110
        if type(value) is not str:
            return False
    return True


def _mapping(value: Mapping[str, Any], field: str, example: str) -> Mapping[str, Any]:
    """A read-only copy of a mapping with string keys; anything else is a UsageError."""
    if type(value) is dict or isinstance(value, Mapping):
        copy = dict(value)
        if _all_text(copy):
            return MappingProxyType(copy)
    raise UsageError(f"{field} takes a dict of names, such as {example}, not {value!r}")


def _parameters(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(value, "parameters", "{'multifd-compression': 'zstd'}")


def _host(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(value, "host", "{'userfaultfd': False}")


def _names(value: str | Iterable[str], field: str, example: str) -> tuple[str, ...]:
    """One name or a collection of names, as a tuple; anything else is a UsageError."""
    if type(value) is str:
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, bytes | bytearray | Mapping):
        names = tuple(value)
        if _all_text(names):
            return names
    raise UsageError(
        f"{field} takes a name or a collection of names, such as {example}, not {value!r}"
    )


def _capabilities(value: str | Iterable[str]) -> frozenset[str]:
    if type(value) is frozenset and _all_text(value):
        return value
    return frozenset(_names(value, "capabilities", "'x-ignore-shared' or {'x-ignore-shared'}"))


def _devices(value: str | Iterable[str]) -> tuple[str, ...]:
    if type(value) is tuple and _all_text(value):
        return value
    return _names(value, "devices", "'vfio' or ('vfio', 'qcow2,node=disk0')")


@attrs.frozen(kw_only=True)
class MemoryBackend:
    """Guest RAM: a backend kind (``ram``, ``memfd``, ``file``), its share flag and an id."""

    kind: str = "ram"
    share: bool = False
    object: bool = False
    path: str | None = None
    id: str = "ram0"

    @classmethod
    def parse(cls, spec: str) -> MemoryBackend:
        """Parse ``KIND[,share=on|off][,path=PATH][,id=ID]``, as ``cprfsm check --memory``.

        As in QEMU's option syntax, ``,,`` is a comma inside a value (a path may hold one).
        """
        kind, *options = split_options(spec.strip())
        fields: dict[str, Any] = {"kind": kind, "object": bool(options) or kind != "ram"}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                raise UsageError(f"memory option {option!r} must be NAME=VALUE in {spec!r}")
            if key == "share":
                fields["share"] = parse_switch(value, f"share in {spec!r}")
            elif key == "path":
                fields[key] = value
            elif key == "id":
                fields[key] = check_name(value, "memory backend id", context=repr(spec))
            else:
                raise UsageError(
                    f"unknown memory option {key!r} in {spec!r}; use share=on|off, path= or id="
                )
        return cls(**fields)

    def unparse(self) -> str:
        """The whole backend (path and id too) as :meth:`parse` reads it back, commas doubled."""
        if not self.object:
            return self.kind
        options = [self.kind.replace(",", ",,"), f"share={'on' if self.share else 'off'}"]
        if self.path is not None:
            options.append(f"path={self.path.replace(',', ',,')}")
        if self.id != "ram0":
            options.append(f"id={self.id}")
        return ",".join(options)

    def spec(self) -> str:
        """The backend spelled as :meth:`parse` reads it."""
        if not self.object:
            return self.kind
        return f"{self.kind},share={'on' if self.share else 'off'}"


def _memory(value: str | MemoryBackend) -> MemoryBackend:
    """A backend string such as ``memfd,share=on`` parsed; a MemoryBackend as it is."""
    if type(value) is MemoryBackend:
        return value
    if type(value) is str:
        return MemoryBackend.parse(value)
    raise UsageError(
        "memory takes a backend string such as 'memfd,share=on' or 'file,share=on,path=/dev/shm/"
        f"ram0', or a MemoryBackend, not {value!r}"
    )


# Configuration's string fields, each with an example of what to pass.
_EXAMPLES = {
    "mode": "'cpr-reboot'",
    "runstate": "'paused'",
    "process": "'running' or 'absent'",
    "migration": "'active'",
    "incoming": "'deferred'",
    "uri": "'file:/var/lib/vm.state'",
}


@attrs.frozen(kw_only=True)
class Configuration:
    """One VM's situation and plan: what QEMU holds when a command arrives.

    ``mode``, ``capabilities`` and ``parameters`` are what the user will set;
    the rest describes the VM and its host.  Names are spelled as QEMU's QAPI
    spells them.  ``memory`` takes a backend string (``"memfd,share=on"``) or a
    :class:`MemoryBackend`; ``capabilities`` and ``devices`` take one name
    (``devices="vfio"``) or a collection of names.  A value of another type
    raises :class:`~cprfsm.exceptions.UsageError` saying what to pass.
    """

    mode: str = "normal"
    capabilities: frozenset[str] = attrs.field(default=frozenset(), converter=_capabilities)
    parameters: Mapping[str, str] = attrs.field(factory=dict, converter=_parameters)
    runstate: str = "running"
    process: str = "running"
    was_suspended: bool = False
    migration: str = "none"
    incoming: str = "none"
    uri: str = "file:/var/lib/cprfsm/vm.state"
    cpr_channel: str | None = None
    devices: tuple[str, ...] = attrs.field(default=(), converter=_devices)
    memory: MemoryBackend = attrs.field(factory=MemoryBackend, converter=_memory)
    aux_ram_share: bool = False
    host: Mapping[str, bool] = attrs.field(factory=dict, converter=_host)

    def __attrs_post_init__(self) -> None:
        """Refuse fields of the wrong type with a UsageError naming what to pass."""
        if not (
            type(self.mode) is str
            and type(self.runstate) is str
            and type(self.process) is str
            and type(self.migration) is str
            and type(self.incoming) is str
            and type(self.uri) is str
            and (self.cpr_channel is None or type(self.cpr_channel) is str)
            and type(self.was_suspended) is bool
            and type(self.aux_ram_share) is bool
        ):
            self._refuse_mistyped()

    def _refuse_mistyped(self) -> None:
        for field, example in _EXAMPLES.items():
            value = getattr(self, field)
            if type(value) is not str:
                raise UsageError(f"{field} takes a string such as {example}, not {value!r}")
        for field in ("was_suspended", "aux_ram_share"):
            if type(getattr(self, field)) is not bool:
                raise UsageError(f"{field} takes True or False, not {getattr(self, field)!r}")
        raise UsageError(
            "cpr_channel takes a unix: URI such as 'unix:/run/cpr.sock', or None, "
            f"not {self.cpr_channel!r}"
        )

    @property
    def transport(self) -> str:
        """The URI scheme of the main migration channel."""
        scheme, sep, _ = self.uri.partition(":")
        if not sep:
            raise UsageError(f"migration URI {self.uri!r} has no scheme; write e.g. file:/path")
        return scheme


@attrs.frozen(kw_only=True)
class Reason:
    """One violated rule: the QMP command that fails, QEMU's exact text, where and why.

    ``aborts`` means QEMU does not report an error but aborts, and ``error`` is
    what it prints as it dies.  An asynchronous failure happens at ``fails_at``:
    ``setup`` (before the VM stops) or ``completion``.
    """

    rule: str
    command: str
    asynchronous: bool
    error: str
    source: str
    hint: str
    aborts: bool = False
    fails_at: str = "setup"

    def to_json(self) -> dict[str, Any]:
        """The reason as a JSON-ready dict."""
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Verdict:
    """What QEMU would do with a request; ``reasons`` holds every violated rule, QEMU's first."""

    qemu: str
    command: str
    steps: tuple[str, ...]
    reasons: tuple[Reason, ...] = ()

    @property
    def allowed(self) -> bool:
        """Whether QEMU accepts every step and the migration does not fail."""
        return not self.reasons

    @property
    def first(self) -> Reason | None:
        """The reason QEMU reports (it stops at the first failure), or None."""
        return self.reasons[0] if self.reasons else None

    @property
    def failed_at(self) -> str | None:
        """The QMP command whose reply (or migration) fails, or None."""
        return self.first.command if self.first else None

    @property
    def error(self) -> str | None:
        """QEMU's exact error text, or None."""
        return self.first.error if self.first else None

    @property
    def asynchronous(self) -> bool:
        """Whether the failure shows only as a failed migration, not as a QMP error."""
        return bool(self.first and self.first.asynchronous)

    @property
    def aborts(self) -> bool:
        """Whether QEMU aborts (the process dies) instead of reporting an error."""
        return bool(self.first and self.first.aborts)

    def summary(self) -> str:
        """One paragraph for people: the verdict, QEMU's words and what to change."""
        if self.first is None:
            return f"QEMU {self.qemu} accepts {' -> '.join(self.steps)}"
        how = (
            "QEMU aborts with"
            if self.aborts
            else "the migration then fails with"
            if self.asynchronous
            else "it replies"
        )
        return (
            f"QEMU {self.qemu} refuses at {self.first.command}: {how} "
            f"{self.first.error!r} [{self.first.rule}, {self.first.source}]. "
            f"To fix: {self.first.hint}."
        )

    def to_json(self) -> dict[str, Any]:
        """The verdict as the JSON object ``cprfsm check --json`` prints."""
        first = self.first
        return {
            "allowed": self.allowed,
            "qemu": self.qemu,
            "command": self.command,
            "steps": list(self.steps),
            "failed_at": self.failed_at,
            "asynchronous": self.asynchronous,
            "aborts": self.aborts,
            "error": self.error,
            "rule": first.rule if first else None,
            "source": first.source if first else None,
            "hint": first.hint if first else None,
            "reasons": [reason.to_json() for reason in self.reasons],
        }


def check(
    config: Configuration | None = None,
    command: str = "migrate",
    *,
    qemu: str | None = None,
    model: QemuModel | None = None,
    walk: bool = True,
) -> Verdict:
    """Decide ``command`` for ``config`` on QEMU ``qemu`` (or an already loaded ``model``).

    The walk sends ``migrate-set-parameters`` when a mode or parameter is set
    and ``migrate-set-capabilities`` when capabilities are, then ``command``.
    With ``walk=False`` only ``command`` itself is checked, for a VM whose mode
    and capabilities are already set.  Unknown names raise UnknownNameError;
    nothing else raises.
    """
    config = config or Configuration()
    model = model or load_model(qemu)
    if command not in COMMANDS:
        raise UnknownNameError("command", command, COMMANDS)
    facts = _facts(model, config)
    steps = _steps(config, command) if walk else (command,)
    reasons = tuple(
        reason
        for step in steps
        for rule in model.rules_for(step)
        if rule.fails_at != "never" and (reason := _match(rule, step, facts))
    )
    return Verdict(qemu=model.version, command=command, steps=steps, reasons=reasons)


def stall(config: Configuration, command: str, model: QemuModel) -> Reason | None:
    """The rule by which an accepted ``command`` never ends (QEMU waits in ``device``)."""
    facts = _facts(model, config)
    for rule in model.rules_for(command):
        if rule.fails_at == "never" and (reason := _match(rule, command, facts)):
            return reason
    return None


def _steps(config: Configuration, command: str) -> tuple[str, ...]:
    steps: list[str] = []
    if command in {"migrate", "migrate-incoming", "migrate-set-parameters"} and (
        config.mode != "normal" or config.parameters or command == "migrate-set-parameters"
    ):
        steps.append("migrate-set-parameters")
    if command in {"migrate", "migrate-incoming", "migrate-set-capabilities"} and (
        config.capabilities or command == "migrate-set-capabilities"
    ):
        steps.append("migrate-set-capabilities")
    if command not in steps:
        steps.append(command)
    return tuple(steps)


def _match(rule: Rule, step: str, facts: Facts) -> Reason | None:
    bindings = rule.when(facts)
    if bindings is None:
        return None
    values = {"region": facts.region, "aux_region": facts.aux_region, **bindings}
    return Reason(
        rule=rule.id,
        command=step,
        asynchronous=rule.asynchronous,
        aborts=rule.aborts,
        fails_at=rule.fails_at,
        error=rule.error.format_map(values),
        source=rule.source.format_map(values),
        hint=rule.hint.format_map(values),
    )


def _facts(model: QemuModel, config: Configuration) -> Facts:
    where = f"QEMU {model.version}"
    mode = model.mode(config.mode)
    _known("capability", config.capabilities, model.capabilities, where)
    _known("runstate", (config.runstate,), model.runstates, where)
    _known("migration status", (config.migration,), model.migration_statuses, where)
    _known("incoming state", (config.incoming,), INCOMING_STATES, where)
    _known("process", (config.process,), ("running", "absent"), where)
    devices = tuple(parse_device(spec, index) for index, spec in enumerate(config.devices))
    by_name = {device.name: device for device in model.devices}
    _known("device", (name for name, _ in devices), by_name, where)
    host_defaults = {fact.name: fact.default for fact in model.host_facts}
    _known("host fact", config.host, host_defaults, where)
    parameters = {p.name: p for p in model.parameters}
    _known("parameter", config.parameters, parameters, where)
    normalized: dict[str, str] = {}
    for name, value in config.parameters.items():
        spelled = str(value).lower() if isinstance(value, bool) else str(value)
        allowed = parameters[name].values
        if allowed is not None and spelled not in allowed:
            raise UnknownNameError(f"value of {name}", spelled, allowed, context=where)
        normalized[name] = spelled
    transport = model.transport(config.transport)
    memory = config.memory
    kinds = [k for k in model.memory_backends if k.name == memory.kind]
    if not kinds:
        raise UnknownNameError(
            "memory backend", memory.kind, {k.name for k in model.memory_backends}
        )
    kind = next((k for k in kinds if (k.object is not None) == memory.object), kinds[0])
    if memory.share and not kind.shareable:
        raise UsageError(f"memory backend {memory.spec()!r} cannot be shared; drop share=on")
    if config.cpr_channel is not None and not config.cpr_channel.startswith("unix:"):
        raise UsageError(f"the cpr channel must be a unix: URI, not {config.cpr_channel!r}")
    return Facts(
        mode=mode.name,
        capabilities=config.capabilities,
        runstate=config.runstate,
        suspended=config.runstate == "suspended" or config.was_suspended,
        migration_running=config.migration in model.running_statuses,
        migration_status=config.migration,
        process=config.process,
        incoming=config.incoming,
        transport=attrs.asdict(transport),
        cpr_channel=config.cpr_channel is not None,
        memory={
            "name": kind.name,
            "shareable": kind.shareable,
            "named_file": kind.named_file,
            "share": memory.share,
        },
        aux_ram_share=config.aux_ram_share,
        devices=devices,
        parameters=normalized,
        parameter_defaults={p.name: p.default for p in model.parameters},
        host={**host_defaults, **config.host},
        region=memory.id if kind.object is not None else _DEFAULT_RAM_REGION,
        aux_region=_LAST_AUX_REGION,
        blocker=_newest_blocker(devices, by_name, mode.name),
        live_runstates=model.live_runstates,
        runstate_table=model.runstate_transitions,
    )


def _newest_blocker(
    devices: tuple[tuple[str, str], ...], by_name: Mapping[str, Device], mode: str
) -> dict[str, str] | None:
    """QEMU reports the blocker added last, so the newest attached blocking device wins."""
    for name, node in reversed(devices):
        for blocker in by_name[name].blockers:
            if mode in blocker.modes:
                return {
                    "blocker": blocker.error.format(node=node),
                    "blocker_hint": blocker.hint.format(node=node),
                    "blocker_source": blocker.source,
                }
    return None


def _known(kind: str, names: Iterable[str], valid: Iterable[str], where: str) -> None:
    valid = tuple(valid)
    for name in names:
        if name not in valid:
            raise UnknownNameError(kind, name, valid, context=where)
