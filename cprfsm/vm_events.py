"""The domain events of one VM's lifecycle: facts QEMU (or the host) made true.

Each event names what happened, in QEMU's terms where QEMU has a name for it
(STOP, RESUME, SUSPEND, WAKEUP, MIGRATION status).  Folding them in order with
:func:`cprfsm.lifecycle.replay` rebuilds the VM's faithful state.  Nothing is
recorded for a command that changes nothing.
"""

from __future__ import annotations

import attrs

from cprfsm.events import Event, event

__all__ = [
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
]


@event("qemu.started")
@attrs.frozen(kw_only=True)
class QemuStarted(Event):
    """A QEMU process started: ``-S`` leaves it in prelaunch, ``-incoming defer`` in inmigrate."""

    incarnation: int
    qemu_version: str
    host_boot: int
    paused: bool
    incoming: bool
    runstate: str
    memory: str
    devices: tuple[str, ...]
    aux_ram_share: bool


@event("qemu.exited")
@attrs.frozen(kw_only=True)
class QemuExited(Event):
    """The QEMU process went away: quit, guest poweroff, a failed incoming load, or an abort."""

    incarnation: int
    reason: str
    detail: str = ""


@event("qemu.upgraded")
@attrs.frozen(kw_only=True)
class QemuUpgraded(Event):
    """The QEMU binary was replaced while no QEMU ran; the next start uses ``qemu_version``."""

    qemu_version: str


@event("host.rebooted")
@attrs.frozen(kw_only=True)
class HostRebooted(Event):
    """The host rebooted; ``lost`` names the artefacts on volatile storage that are gone."""

    host_boot: int
    lost: tuple[str, ...]


@event("vm.stopped")
@attrs.frozen(kw_only=True)
class VmStopped(Event):
    """QEMU's STOP: a live VM stopped into ``runstate``; ``was_suspended`` is QEMU's flag."""

    runstate: str
    was_suspended: bool


@event("vm.resumed")
@attrs.frozen(kw_only=True)
class VmResumed(Event):
    """QEMU's RESUME: the VM started again, in running or (flag set) suspended."""

    runstate: str


@event("vm.runstate-set")
@attrs.frozen(kw_only=True)
class RunstateSet(Event):
    """QEMU changed the runstate without a QMP event (runstate_set on a stopped VM)."""

    runstate: str
    was_suspended: bool


@event("guest.suspended")
@attrs.frozen(kw_only=True)
class GuestSuspended(Event):
    """QEMU's SUSPEND: the guest entered ACPI S3."""


@event("guest.woke-up")
@attrs.frozen(kw_only=True)
class GuestWokeUp(Event):
    """QEMU's WAKEUP after system_wakeup: the guest runs again."""


@event("guest.reset")
@attrs.frozen(kw_only=True)
class GuestReset(Event):
    """QEMU's RESET: the guest was reset into ``runstate``; the suspended flag is cleared."""

    runstate: str


@event("vm.autostart-changed")
@attrs.frozen(kw_only=True)
class AutostartChanged(Event):
    """stop or cont while inmigrate: whether the VM starts when the incoming migration ends."""

    autostart: bool


@event("migration.parameters-set")
@attrs.frozen(kw_only=True)
class ParametersSet(Event):
    """migrate-set-parameters was accepted: the mode and parameters now in force."""

    mode: str
    parameters: tuple[tuple[str, str], ...]


@event("migration.capabilities-set")
@attrs.frozen(kw_only=True)
class CapabilitiesSet(Event):
    """migrate-set-capabilities was accepted: the capabilities now on."""

    capabilities: frozenset[str]


@event("migration.started")
@attrs.frozen(kw_only=True)
class MigrationStarted(Event):
    """migrate was accepted: the plan QEMU sampled (status goes none -> setup)."""

    uri: str
    mode: str
    capabilities: frozenset[str]
    runstate: str
    was_suspended: bool


@event("migration.incoming-started")
@attrs.frozen(kw_only=True)
class IncomingStarted(Event):
    """migrate-incoming was accepted on a QEMU waiting with -incoming defer (status setup)."""

    uri: str


@event("migration.status")
@attrs.frozen(kw_only=True)
class MigrationStatusReported(Event):
    """QEMU's MIGRATION event: the outgoing or incoming migration reached ``status``."""

    side: str
    status: str
    error: str = ""


@event("operation.started")
@attrs.frozen(kw_only=True)
class OperationStarted(Event):
    """Intent: a device or memory operation is about to run through a port."""

    operation: str
    target: str


@event("operation.failed")
@attrs.frozen(kw_only=True)
class OperationFailed(Event):
    """Outcome: the operation failed with ``error``; QEMU's compensation follows."""

    operation: str
    error: str


@event("device-state.saved")
@attrs.frozen(kw_only=True)
class DeviceStateSaved(Event):
    """Outcome: device state was written to the migration stream."""

    bytes_written: int
    digest: str


@event("ram.saved")
@attrs.frozen(kw_only=True)
class RamSaved(Event):
    """Outcome: guest RAM was written, except the blocks x-ignore-shared (or the mode) skips."""

    bytes_written: int
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    digest: str


@event("state-file.written")
@attrs.frozen(kw_only=True)
class StateFileWritten(Event):
    """Outcome: the stream at ``uri`` is complete; ``ram_in_place`` files hold the skipped RAM."""

    uri: str
    bytes_written: int
    runstate: str
    was_suspended: bool
    mode: str
    validated: frozenset[str]
    qemu_version: str
    digest: str
    ram_in_place: tuple[str, ...] = ()
    ram_digest: str = ""


@event("hazard.reported")
@attrs.frozen(kw_only=True)
class HazardReported(Event):
    """Before a step that can lose guest data (or cost more than expected): what and why."""

    rule: str
    detail: str
    hint: str
    loses_data: bool


@event("guest-data.lost")
@attrs.frozen(kw_only=True)
class GuestDataLost(Event):
    """After a restore: guest RAM differs from what was saved; ``hazards`` are their versions."""

    detail: str
    hazards: tuple[int, ...]


@event("device-state.loaded")
@attrs.frozen(kw_only=True)
class DeviceStateLoaded(Event):
    """Outcome: device state was read back from the incoming stream."""

    bytes_read: int
    digest: str


@event("ram.loaded")
@attrs.frozen(kw_only=True)
class RamLoaded(Event):
    """Outcome: guest RAM was read back; ``kept`` blocks were left in place (x-ignore-shared)."""

    bytes_read: int
    loaded: tuple[str, ...]
    kept: tuple[str, ...]
    digest: str


@event("model.diverged")
@attrs.frozen(kw_only=True)
class ModelDiverged(Event):
    """QEMU reported facts the model did not predict for ``command``; both sides are kept.

    ``expected`` and ``observed`` are QMP event labels followed by ``runstate X``,
    ``status Y`` and ``error Z``; the QemuObserved event that follows adopts QEMU's side.
    """

    command: str
    expected: tuple[str, ...]
    observed: tuple[str, ...]


@event("qemu.observed")
@attrs.frozen(kw_only=True)
class QemuObserved(Event):
    """QEMU's own account of its state (query-status, query-migrate), adopted as the truth.

    Recorded when a watch begins, after a divergence, and when an interrupted
    operation is settled; ``runstate`` None means no QEMU process was found.
    """

    runstate: str | None
    status: str
    error: str = ""
    detail: str = ""
