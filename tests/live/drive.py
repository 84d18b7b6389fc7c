"""Drive the lifecycle machine on a live QEMU through the shipped QMP executor, step by step.

After every step the machine's outcome must be QEMU's: the machine itself compares
what QEMU reported (events, runstate, migration status and error) with the model's
prediction and records ``model.diverged`` where they differ, so a step is checked by
asserting that it recorded no divergence.  A command the model refuses is not sent
by the machine; the harness sends it to QEMU directly and requires QEMU to refuse it
with the same text (or, for a predicted abort, to abort with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cprfsm import IllegalTransition
from cprfsm import vm_events as ev
from cprfsm.exceptions import ExecutorError, QemuAbortPredicted, UsageError
from cprfsm.executor import Command, VmDefinition
from cprfsm.machine import VirtualMachine
from cprfsm.qmp import Guest, QmpExecutor
from cprfsm.store import InMemoryStore

if TYPE_CHECKING:
    from pathlib import Path

    from cprfsm.events import Event

#: Refusals of cprfsm's own, for commands QEMU never sees (no process, or one already).
OWN_RULES = frozenset({"qemu-not-running", "qemu-running", "guest-not-running"})

#: The QMP command and arguments each machine method sends.
QMP = {
    "stop": ("stop", {}),
    "cont": ("cont", {}),
    "system_wakeup": ("system_wakeup", {}),
    "migrate_cancel": ("migrate_cancel", {}),
    "migrate_continue": ("migrate-continue", {"state": "pre-switchover"}),
}


class Refused(Exception):
    """Both the model and QEMU refused the step with ``text``."""

    def __init__(self, text: str) -> None:
        """Keep the shared refusal text."""
        super().__init__(text)
        self.text = text


class Driven:
    """One VM on a live QEMU: the machine, its executor and every step's check."""

    def __init__(
        self, workdir: Path, definition: VmDefinition | None = None, guest: Guest = Guest.LOOP
    ) -> None:
        """A VM whose QEMU runs in ``workdir`` and whose log is kept in memory."""
        self.workdir = workdir
        self.uri = f"file:{workdir / 'vm.state'}"
        self.executor = QmpExecutor(workdir, guest=guest, settle_timeout=30.0)
        self.store = InMemoryStore()
        self.machine = VirtualMachine(
            "vm", store=self.store, executor=self.executor, definition=definition, qemu="10.0"
        )
        self.steps: list[str] = []

    def close(self) -> None:
        """Kill QEMU and detach the machine."""
        self.machine.close()

    def do(self, command: str, *args: Any, **kwargs: Any) -> tuple[Event, ...]:
        """Run the machine's ``command``; raise Refused when model and QEMU both refuse it."""
        shown = [*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())]
        step = f"{command}({', '.join(shown)})"
        self.steps.append(step)
        where = (
            f"step {len(self.steps)} {step} (after {' -> '.join(self.steps[:-1]) or 'nothing'})"
        )
        try:
            events = getattr(self.machine, command)(*args, **kwargs)
        except IllegalTransition as exc:
            self._same_refusal(where, command, args, kwargs, exc)
            raise Refused(exc.verdict.error or "") from None
        except QemuAbortPredicted as exc:
            self._same_abort(where, command, exc)
            raise
        except ExecutorError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        diverged = [e for e in events if isinstance(e, ev.ModelDiverged)]
        assert not diverged, f"{where}: QEMU diverged from the model: {diverged}"
        live = self.executor.observe(0)
        assert (self.machine.state.runstate, self.machine.runstate) == (live.runstate,) * 2, (
            f"{where}: runstate machine {self.machine.state.runstate!r}, QEMU {live.runstate!r}"
        )
        return tuple(events)

    def _same_refusal(
        self,
        where: str,
        command: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        refusal: IllegalTransition,
    ) -> None:
        first = refusal.verdict.first
        assert first is not None
        if first.rule in OWN_RULES or first.rule == "qemu-refused":
            return
        report = self.executor.execute(_qmp(command, args, kwargs, self.machine))
        assert report.refused == refusal.verdict.error, (
            f"{where}: model refused with {refusal.verdict.error!r} ({first.rule}), "
            f"QEMU answered {report.refused!r} and reported {report.labels}"
        )

    def _same_abort(self, where: str, command: str, abort: QemuAbortPredicted) -> None:
        if abort.events:  # the machine sent the command and recorded QEMU's abort
            return
        report = self.executor.execute(_qmp(command, (), {}, self.machine))
        exited = report.exit
        assert exited is not None, f"{where}: model predicted an abort, QEMU went on: {report}"
        assert abort.error in exited.message, (where, exited)
        self.machine.observe()  # the log learns that the process is gone


def _qmp(
    command: str, args: tuple[Any, ...], kwargs: dict[str, Any], machine: VirtualMachine
) -> Command:
    """The command the machine would have sent for ``command`` (refused before sending)."""
    if command in QMP:
        name, arguments = QMP[command]
        return Command(name=name, arguments=arguments)
    if command == "set_capabilities":
        return Command(name="migrate-set-capabilities", arguments={"capabilities": args[0]})
    if command == "set_parameters":
        arguments = dict(kwargs.get("parameters") or {})
        if kwargs.get("mode") is not None:
            arguments["mode"] = kwargs["mode"]
        return Command(name="migrate-set-parameters", arguments=arguments)
    if command in {"migrate", "migrate_incoming"}:
        return Command(name=command.replace("_", "-"), arguments={"uri": args[0]})
    message = f"no QMP command to compare a refused {command} with ({machine.state.runstate})"
    raise UsageError(message)
