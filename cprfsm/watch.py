"""Mirror a QEMU someone else started: record every lifecycle fact it reports, as events.

:func:`watch` connects to one of QEMU's QMP monitors (a second ``-qmp`` socket
leaves the first to its owner), adopts the running QEMU into a VM's log
(:meth:`VirtualMachine.attach <cprfsm.machine.VirtualMachine.attach>`) with the
migration settings it holds, then records what QEMU reports unasked, one
atomic append per batch, until QEMU exits or ``stop`` is set.  It needs the
``qmp`` extra; ``import cprfsm`` never imports it.

QMP has no event for a change of migration capabilities or parameters, so the
watcher asks QEMU for them when it attaches and again when a migration starts
(a ``MIGRATION setup`` event, emitted with the ``events`` capability on, or a
``STOP``, the only sign of a migration without it): QEMU refuses to change
capabilities while a migration runs, so the settings read then are the
migration's.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from cprfsm.exceptions import ExecutorError, UsageError
from cprfsm.executor import MigrationSettings, QmpEvent, Report
from cprfsm.machine import VirtualMachine
from cprfsm.store import EventStore, SQLiteStore

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from cprfsm.events import Event
    from cprfsm.lifecycle import VmState
    from cprfsm.qmp import QmpExecutor

__all__ = ["connect", "migration_settings", "watch"]

#: Seconds to wait for the QMP socket to accept the connection and greet.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for QEMU to settle (quiet, out of finish-migrate) before adopting its account.
SETTLE_TIMEOUT = 5.0
_QUIET = 0.05  # seconds without an event after which QEMU's account is taken as settled
_ENDED = frozenset({"completed", "failed", "cancelled"})


def connect(socket: str | os.PathLike[str], *, timeout: float = CONNECT_TIMEOUT) -> QmpExecutor:
    """An attached QMP executor on the QMP socket ``socket``; UsageError if nobody answers."""
    try:
        from cprfsm.qmp import QmpExecutor  # noqa: PLC0415 - the qmp extra is optional
    except ImportError as exc:
        raise UsageError(
            f"watching QEMU needs the qmp extra ({exc}): pip install 'cprfsm[qmp]'"
        ) from None
    path = Path(socket)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"no QMP socket at {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} is not a unix socket: give the path of QEMU's -qmp socket")
    try:
        return QmpExecutor.attach(path, settle_timeout=timeout, command_timeout=timeout)
    except ExecutorError as exc:
        raise UsageError(
            f"cannot connect to QMP at {path} (refused, or another client holds it): {exc}"
        ) from None


def migration_settings(executor: QmpExecutor) -> MigrationSettings | None:
    """The migration mode, parameters and capabilities QEMU holds now; None if it is gone."""
    try:
        parameters: dict[str, Any] = dict(executor.query("query-migrate-parameters"))
        capabilities = executor.query("query-migrate-capabilities")
    except ExecutorError:
        return None
    mode = str(parameters.pop("mode", "normal"))
    return MigrationSettings(
        mode=mode,
        parameters={name: _spelled(value) for name, value in parameters.items()},
        capabilities=frozenset(str(c["capability"]) for c in capabilities if c["state"]),
    )


def watch(  # noqa: PLR0913 - keyword-only settings of one watch
    socket: str | os.PathLike[str] | QmpExecutor,
    *,
    store: EventStore | str | os.PathLike[str],
    vm: str,
    qemu: str | None = None,
    on_events: Callable[[tuple[Event, ...]], None] | None = None,
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> VmState:
    """Record what the QEMU on QMP ``socket`` does in ``vm``'s log until it exits or ``stop``.

    ``socket`` is the path of the QMP socket, or an executor :func:`connect`
    made (the watch closes it, which only disconnects).  ``store`` is an
    event store or the path of an SQLite store (created if missing); ``qemu``
    is the release installed, for a new log.  Every batch of events is one
    atomic append, handed to ``on_events`` once stored.
    Returns the VM's state after the last batch.
    """
    executor = connect(socket) if isinstance(socket, str | os.PathLike) else socket
    try:
        events_store = SQLiteStore(store) if isinstance(store, str | os.PathLike) else store
    except BaseException:
        executor.close()
        raise
    try:
        with VirtualMachine(vm, store=events_store, executor=executor, qemu=qemu) as machine:

            def recorded(events: tuple[Event, ...]) -> None:
                if events and on_events is not None:
                    on_events(events)

            known = machine.state.qemu_running  # watched before: adopt QEMU's account
            recorded(machine.attach(migration_settings(executor)))
            if known:
                recorded(machine.adopt(executor.observe(0.0), migration_settings(executor)))
            while machine.state.qemu_running and not (stop is not None and stop.is_set()):
                report = _settled(executor, executor.observe(poll))
                settings = migration_settings(executor) if _migration_starts(report) else None
                recorded(machine.adopt(report, settings))
            return machine.state
    finally:
        executor.close()  # attached: it only disconnects (idempotent)
        if events_store is not store:
            events_store.close()


def _settled(executor: QmpExecutor, report: Report) -> Report:
    """``report``, extended until QEMU is quiet: no new event, the same runstate and status.

    ``query-status`` and ``query-migrate`` are two commands, and QEMU emits an
    event a moment after the change it reports: a single report can pair a
    runstate with a status QEMU never held together (running with a migration
    completed), or show finish-migrate before its STOP.  Adopting such a moment
    would record a state QEMU is about to leave.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline and report.exit is None:
        later = executor.observe(_QUIET)
        quiet = not later.facts and (later.runstate, later.status) == (
            report.runstate,
            report.status,
        )
        report = attrs.evolve(later, facts=report.facts + later.facts)
        if quiet and not (report.runstate == "finish-migrate" and report.status in _ENDED):
            break
    return report


def _migration_starts(report: Report) -> bool:
    """Whether the report may hold a migration's start: ``MIGRATION setup``, or a STOP.

    Without the ``events`` capability QEMU emits no MIGRATION event; the STOP
    of the switch-over is the only sign of a migration.
    """
    return any(
        isinstance(fact, QmpEvent) and fact.label in {"MIGRATION setup", "STOP"}
        for fact in report.facts
    )


def _spelled(value: Any) -> str:
    """A QMP parameter value as the model spells it (booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
