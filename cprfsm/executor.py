"""The executor: the one port through which the lifecycle machine acts on QEMU.

An executor carries out a command at QEMU's level (a QMP command, starting or
quitting the QEMU process, rebooting the host) and reports the facts QEMU
reported while doing it: the QMP events in the order QEMU emitted them, the
runstate and migration status once QEMU settled, and the exit of the process.
It never decides anything; the machine decides, then checks every fact the
executor reports against the model's prediction and records it.

cprfsm ships two executors: the simulator (:mod:`cprfsm.simulator`), which
performs the operations on real memory and files, and the QMP executor
(:mod:`cprfsm.qmp`, the ``qmp`` extra), which drives a real QEMU.  A VMM may
plug in its own: anything with the methods of :class:`Executor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
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
]

#: The commands an executor carries out.  QMP commands are spelled as QMP spells
#: them; ``start``, ``quit`` and ``reboot-host`` act on the process and the host;
#: ``guest-suspend`` waits for (or, in the simulator, performs) the guest
#: entering ACPI S3, which a guest does by itself.
COMMANDS = frozenset(
    {
        "start",
        "quit",
        "reboot-host",
        "guest-suspend",
        "guest-reset",
        "guest-shutdown",
        "stop",
        "cont",
        "system_wakeup",
        "migrate-set-parameters",
        "migrate-set-capabilities",
        "migrate",
        "migrate-continue",
        "migrate_cancel",
        "migrate-incoming",
    }
)


@attrs.frozen(kw_only=True)
class VmDefinition:
    """What QEMU's command line fixes: machine, guest RAM and its backend, devices.

    ``memory`` is a backend as :class:`cprfsm.MemoryBackend` parses it
    (``ram``, ``memfd,share=on``, ``file,share=on,path=/dev/dax0.0``).
    ``extra_args`` are passed to QEMU unchanged by executors that start QEMU.
    """

    memory: str = "ram"
    ram_size: int = 64 * 2**20
    devices: tuple[str, ...] = ()
    aux_ram_share: bool = False
    machine: str = "pc"
    extra_args: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Command:
    """One command for the executor: its name (see :data:`COMMANDS`) and its arguments.

    Arguments by command: ``start`` takes ``definition`` (a VmDefinition),
    ``paused`` and ``incoming`` (``-S`` and ``-incoming defer``);
    ``migrate-set-parameters`` the QMP parameters (``mode`` among them);
    ``migrate-set-capabilities`` ``capabilities``, a mapping of name to bool;
    ``migrate`` and ``migrate-incoming`` ``uri``.
    """

    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class QmpEvent:
    """A QMP event QEMU emitted (``STOP``, ``RESUME``, ``MIGRATION`` with its ``status``...)."""

    name: str
    data: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        """The event as one comparable label: ``MIGRATION active``, ``STOP``."""
        if self.name == "MIGRATION":
            return f"MIGRATION {self.data.get('status', '')}"
        return self.name


@attrs.frozen(kw_only=True)
class Exited:
    """The QEMU process ended: its exit code or the signal that killed it, and its last words."""

    code: int | None = None
    signal: int | None = None
    message: str = ""


@attrs.frozen(kw_only=True)
class Transferred:
    """What an operation moved, where the executor can measure it (the simulator can).

    ``operation`` is one of ``ram.save``, ``devices.save``, ``stream.commit``,
    ``ram.load``, ``devices.load``; ``blocks`` names the RAM blocks moved.
    """

    operation: str
    bytes: int
    digest: str = ""
    blocks: tuple[str, ...] = ()


Fact = QmpEvent | Exited | Transferred


@attrs.frozen(kw_only=True)
class Report:
    """What QEMU reported for one command, in QEMU's order, once it settled.

    ``refused`` is QEMU's error text when it refused the command (a QMP error);
    ``runstate`` is ``query-status`` afterwards (None when no process is left);
    ``status`` and ``error`` are ``query-migrate``'s status and error-desc of
    the side the command concerns (``none`` and empty when there is none);
    ``lost`` names what a host reboot wiped; ``ram_digest`` is a digest of guest
    RAM where the executor can take one (the simulator can).
    """

    facts: tuple[Fact, ...] = ()
    refused: str | None = None
    runstate: str | None = None
    status: str = "none"
    error: str = ""
    lost: tuple[str, ...] = ()
    ram_digest: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        """The QMP events as labels, in QEMU's order."""
        return tuple(fact.label for fact in self.facts if isinstance(fact, QmpEvent))

    @property
    def exit(self) -> Exited | None:
        """The process exit among the facts, if the process ended."""
        return next((fact for fact in self.facts if isinstance(fact, Exited)), None)


@attrs.frozen(kw_only=True)
class MigrationSettings:
    """The migration settings QEMU holds: its mode, parameters (spelled as strings), capabilities.

    QMP emits no event when a client changes them; a watcher asks QEMU
    (``query-migrate-parameters``, ``query-migrate-capabilities``).
    """

    mode: str = "normal"
    parameters: Mapping[str, str] = attrs.field(factory=dict)
    capabilities: frozenset[str] = frozenset()


class Executor(Protocol):
    """Carries out commands at QEMU's level and reports what QEMU reported."""

    def execute(self, command: Command) -> Report:
        """Carry out ``command``, wait (bounded) until QEMU settles, report what happened."""

    def observe(self, timeout: float) -> Report:
        """Facts QEMU reported unasked (another client, the guest), waiting up to ``timeout``."""

    def volatile(self, path: str) -> bool:
        """Whether ``path`` is on storage a host reboot wipes."""

    def close(self) -> None:
        """Release everything: no QEMU process of this executor is left running."""


@attrs.frozen(kw_only=True)
class RamBlock:
    """One guest RAM block: its name, size and how it is backed."""

    name: str
    size: int
    shared: bool
    named_file: bool
    path: str | None = None


def ram_blocks(definition: VmDefinition) -> tuple[RamBlock, ...]:
    """The guest RAM blocks QEMU creates for ``definition``, named as QEMU names them.

    Plain ``-m`` RAM is the block ``pc.ram``; a memory backend object is named
    by its id (``ram0`` unless the backend says otherwise).
    """
    from cprfsm.legality import MemoryBackend  # noqa: PLC0415 - legality imports this module

    backend = MemoryBackend.parse(definition.memory)
    return (
        RamBlock(
            name=backend.id if backend.object else "pc.ram",
            size=definition.ram_size,
            shared=backend.share,
            named_file=backend.kind == "file",
            path=backend.path if backend.kind == "file" else None,
        ),
    )
