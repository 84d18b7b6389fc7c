"""The ``cprfsm`` command: the library's answers for people (default) and scripts (--json).

Every failure is one line on stderr, ``cprfsm: error: WHAT; WHAT TO DO``, and exit
status 2.  With ``--json`` that line is one JSON object instead, still on stderr
(stdout carries only answers, so a script never mistakes an error for one):
``{"error": "WHAT; WHAT TO DO", "type": "UsageError"}``, where ``type`` names the
:class:`~cprfsm.exceptions.CprFsmError` subclass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from cprfsm import vm_events as ev
from cprfsm._options import parse_switch
from cprfsm.events import default_registry
from cprfsm.exceptions import (
    CprFsmError,
    ForeignStoreError,
    LogMismatchError,
    StoreNotFoundError,
    UnknownNameError,
    UsageError,
)
from cprfsm.legality import Configuration, MemoryBackend, Verdict, check
from cprfsm.lifecycle import fold, initial_state
from cprfsm.model import COMMANDS, load_model
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cprfsm.events import Event, RecordedEvent
    from cprfsm.lifecycle import VmState

__all__ = ["main"]

EXIT_ALLOWED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors go through the same path as every other usage error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 done or allowed, 1 refused, 2 error)."""
    parser = _build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    as_json = _asks_for_json(words)  # until the parse says for sure
    try:
        args = parser.parse_args(words)
        as_json = bool(getattr(args, "json", False))
        _configure_logging(verbose=args.verbose)
        result: int = args.run(args)
    except SystemExit as exc:  # --help and --version end the parse
        return exc.code if isinstance(exc.code, int) else EXIT_ALLOWED
    except CprFsmError as exc:
        # Notes say where a stored event sits; they stay on the message's one line.
        message = " ".join("; ".join([str(exc), *getattr(exc, "__notes__", ())]).split())
        if as_json:
            error = {"error": message, "type": type(exc).__name__}
            print(json.dumps(error, separators=(",", ":")), file=sys.stderr)
        else:
            print(f"cprfsm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``cprfsm log STORE | head``): stop quietly.  Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ALLOWED
    return result


def _asks_for_json(words: list[str]) -> bool:
    """Whether ``--json`` (or an abbreviation argparse accepts) is among the options."""
    options = words[: words.index("--")] if "--" in words else words
    return any(w.startswith("--j") and "--json".startswith(w) for w in options)


def _configure_logging(*, verbose: bool) -> None:
    """The command line is an application: its logs go to stderr, debug only with -v."""
    level = logging.DEBUG if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cprfsm", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every transition to stderr"
    )
    commands = parser.add_subparsers(title="commands", required=True, parser_class=_Parser)
    chk = commands.add_parser(
        "check",
        help="would QEMU accept this migration request, and if not, what would it say?",
        description=(
            "Walk migrate-set-parameters, migrate-set-capabilities and COMMAND through the "
            "model of one QEMU release and report the first step QEMU refuses. "
            "Exit status: 0 allowed, 1 refused, 2 usage error."
        ),
    )
    chk.add_argument(
        "command",
        nargs="?",
        default="migrate",
        choices=COMMANDS,
        metavar="COMMAND",
        help=f"the QMP command to check (default migrate; one of {', '.join(COMMANDS)})",
    )
    chk.add_argument("--qemu", metavar="VERSION", help="QEMU release (default: newest modelled)")
    chk.add_argument("--model", metavar="PATH", help="a model file of your own (default: shipped)")
    chk.add_argument("--mode", default="normal", help="migration mode (default normal)")
    chk.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="CAP",
        help="a migration capability to enable (repeatable)",
    )
    chk.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a migration parameter to set (repeatable)",
    )
    chk.add_argument("--runstate", default="running", help="QEMU runstate (default running)")
    chk.add_argument(
        "--was-suspended",
        action="store_true",
        help="the guest was suspended when it was stopped (QEMU's hidden flag)",
    )
    chk.add_argument(
        "--migration",
        default="none",
        metavar="STATUS",
        help="current outgoing migration status (default none)",
    )
    chk.add_argument(
        "--incoming",
        default="none",
        choices=("none", "deferred", "started", "completed", "wedged"),
        help="-incoming state of this QEMU (default none)",
    )
    chk.add_argument(
        "--uri",
        default="file:/var/lib/cprfsm/vm.state",
        help="migration URI (default file:/var/lib/cprfsm/vm.state)",
    )
    chk.add_argument(
        "--cpr-channel", metavar="URI", help="the cpr channel (cpr-transfer), unix:PATH"
    )
    chk.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="DEVICE",
        help="an attached device: vfio, or a block format such as vdi (repeatable)",
    )
    chk.add_argument(
        "--memory",
        default="ram",
        metavar="BACKEND",
        help="guest RAM backend: ram, ram,share=on, memfd,share=on, file,share=on ...",
    )
    chk.add_argument(
        "--aux-ram-share", action="store_true", help="QEMU runs with -machine aux-ram-share=on"
    )
    chk.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="FACT=on|off",
        help="override a host fact such as replication or uffd-wp (repeatable)",
    )
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.set_defaults(run=_run_check)
    log = commands.add_parser(
        "log",
        help="print the event log of a store",
        description=(
            "Print every event of an SQLite event store, stream by stream in version order: "
            "one line per event, or one JSON object per line with --json. "
            "Exit status: 0 printed, 2 the store cannot be read."
        ),
    )
    _store_arguments(log)
    log.add_argument("--json", action="store_true", help="print one JSON object per event")
    log.set_defaults(run=_run_log)
    rep = commands.add_parser(
        "replay",
        help="rebuild a VM's state from its event log",
        description=(
            "Fold a VM's event log through the model and print the faithful state it "
            "rebuilds and its lifecycle phase, after the whole log or after event --at. "
            "Exit status: 0 printed, 2 the store cannot be read or the log does not fit "
            "the model."
        ),
    )
    _store_arguments(rep)
    rep.add_argument(
        "--at",
        type=int,
        metavar="VERSION",
        help="stop after event VERSION (0 is the state before any event; default: the end)",
    )
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.set_defaults(run=_run_replay)
    demo = commands.add_parser(
        "demo",
        help="run a whole cpr-reboot cycle on the simulator or a real QEMU, recorded",
        description=(
            "Start a guest on the simulator (real memory, real files) or on a real QEMU 10.0, "
            "save it with migrate in mode cpr-reboot, quit, optionally reboot the host, "
            "restore it and compare its RAM. Every step is decided by the model and recorded "
            "in --store. Exit status: 0 restored intact, 1 refused, failed or data lost, "
            "2 usage error."
        ),
    )
    demo.add_argument(
        "--backend",
        choices=("sim", "qemu", "auto"),
        default="auto",
        help="sim: the simulator; qemu: a real QEMU 10.0 over QMP; auto (default): qemu "
        "when qemu-system-x86_64 10.0 ($CPRFSM_QEMU) and the qmp extra are installed and "
        "no --device vfio is asked for, else sim",
    )
    demo.add_argument(
        "--store",
        default="cprfsm-demo.sqlite",
        metavar="PATH",
        help="the SQLite event store (default ./cprfsm-demo.sqlite)",
    )
    demo.add_argument("--ram", default="64M", metavar="SIZE", help="guest RAM (default 64M)")
    demo.add_argument(
        "--memory",
        default="file,share=on",
        metavar="BACKEND",
        help="RAM backend as in check; a file backend takes path=PATH "
        "(tmpfs such as /dev/shm is volatile across a reboot)",
    )
    demo.add_argument(
        "--uri", metavar="URI", help="where the state goes (default: a file beside the store)"
    )
    demo.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="CAP",
        help="a migration capability to enable (repeatable)",
    )
    demo.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="DEVICE",
        help="an attached device: vfio, or a disk image format (repeatable)",
    )
    demo.add_argument("--suspend", action="store_true", help="suspend the guest first")
    demo.add_argument(
        "--reboot", action="store_true", help="reboot the host between quit and restart"
    )
    demo.add_argument(
        "--strict",
        action="store_true",
        help="refuse a step that would lose guest data instead of recording it",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=_run_demo)
    _add_watch(commands)
    return parser


def _add_watch(commands: Any) -> None:
    wat = commands.add_parser(
        "watch",
        help="record what a QEMU someone else started does, as events",
        description=(
            "Connect to QMP_SOCKET (for example a second -qmp socket of a QEMU someone else "
            "started), record the QEMU in the log of --vm in --store, then every lifecycle "
            "fact it reports, one line per event as it is stored, until QEMU exits or Ctrl-C. "
            "Exit status: 0 QEMU exited or interrupted (every batch stored), 2 the socket, "
            "the connection or the store failed."
        ),
    )
    wat.add_argument("socket", metavar="QMP_SOCKET", help="the QMP unix socket of the QEMU")
    wat.add_argument(
        "--store", required=True, metavar="PATH", help="the SQLite event store (created if new)"
    )
    wat.add_argument("--vm", required=True, metavar="NAME", help="the VM's stream id")
    wat.add_argument(
        "--qemu", metavar="VERSION", help="the QEMU release installed (default: newest modelled)"
    )
    wat.add_argument("--json", action="store_true", help="print one JSON object per line")
    wat.set_defaults(run=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from cprfsm.watch import connect, watch  # noqa: PLC0415 - the qmp extra loads only here

    stop = threading.Event()
    restore = _stop_on_signals(stop)
    try:
        executor = connect(args.socket)  # before the store: a bad socket creates no file
        try:
            store = _watch_store(args.store)
        except BaseException:
            executor.close()
            raise
        with store:
            shown = store.version(args.vm)
            counts = {"recorded": 0, "diverged": 0}

            def show(events: tuple[Event, ...]) -> None:
                nonlocal shown
                for recorded in store.read(args.vm, first=shown + 1):
                    print(_json_line(recorded) if args.json else _log_line(recorded), flush=True)
                    shown = recorded.version
                counts["recorded"] += len(events)
                counts["diverged"] += sum(isinstance(e, ev.ModelDiverged) for e in events)

            state = watch(
                executor, store=store, vm=args.vm, qemu=args.qemu, on_events=show, stop=stop
            )
    finally:
        restore()
    ended = "interrupted" if state.qemu_running else "qemu-exited"
    summary = {
        "type": "watch.summary",
        "vm": args.vm,
        "ended": ended,
        "events": counts["recorded"],
        "diverged": counts["diverged"],
        "version": state.version,
        "runstate": state.runstate,
        "phase": state.phase,
    }
    if args.json:
        print(json.dumps(summary, separators=(",", ":")), flush=True)
    else:
        runstate = state.runstate or "none (QEMU exited)"
        print(
            f"watched {args.vm}: {ended}; {counts['recorded']} events recorded, "
            f"{counts['diverged']} divergences; runstate {runstate}, log at version "
            f"{state.version}",
            flush=True,
        )
    return EXIT_ALLOWED


def _watch_store(path: str) -> SQLiteStore:
    """The store the watch records into: created if new, never a file of something else."""
    try:
        return SQLiteStore(path)
    except ForeignStoreError as exc:
        remedy = "give the path of a cprfsm event store, or of a new file"
        raise ForeignStoreError(exc.path, exc.problem, remedy) from None


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make Ctrl-C (and SIGTERM) set ``stop``; return what puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    signals = (signal.SIGINT, signal.SIGTERM)
    old = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        signal.signal(number, lambda *_: stop.set())

    def restore() -> None:
        for number, handler in old.items():
            signal.signal(number, handler)

    return restore


def _run_demo(args: argparse.Namespace) -> int:
    from cprfsm.demo import (  # noqa: PLC0415 - the simulator loads only for the demo
        DemoOptions,
        default_progress,
        parse_size,
        run_demo,
    )

    options = DemoOptions(
        store=Path(args.store),
        ram=parse_size(args.ram),
        memory=args.memory,
        uri=args.uri,
        capabilities=tuple(args.cap),
        devices=tuple(args.device),
        suspend=args.suspend,
        reboot=args.reboot,
        strict=args.strict,
        backend=args.backend,
    )
    report = run_demo(options, progress=None if args.json else default_progress())
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_render_demo(report))
    ok = report.outcome == "restored" and not report.data_lost
    return EXIT_ALLOWED if ok else EXIT_REFUSED


def _render_demo(report: Any) -> str:
    # The qemu backend compares the guest's boot marker; the simulator digests all its RAM.
    ram = "RAM marker:" if report.backend == "qemu" else "RAM digest:"
    lines = [
        f"cprfsm demo: {report.vm} in {report.store} (backend {report.backend})",
        "",
        "timeline:",
    ]
    lines += [
        f"  {e.version:4d}  {e.phase:9s} {e.runstate or '-':15s} {e.event:28s} {e.detail}"
        for e in report.timeline
    ]
    lines += [
        "",
        f"outcome:          {report.outcome}" + (f" ({report.error})" if report.error else ""),
        f"phase, runstate:  {report.phase}, {report.runstate}",
        f"state file:       {report.state_file_bytes} bytes",
        f"save, restore:    {report.save_seconds:.3f} s, {report.restore_seconds:.3f} s",
        f"{ram:18s}{report.ram_digest_before or '-'} -> {report.ram_digest_after or '-'}",
        f"hazards:          {', '.join(report.hazards) or 'none'}",
        f"guest data lost:  {_yes(report.data_lost)}",
    ]
    return "\n".join(lines)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="the SQLite event store file")
    parser.add_argument(
        "--vm", metavar="ID", help="only this VM (its stream id; default: every VM)"
    )


def _pairs(items: list[str], what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} {item!r} must be written NAME=VALUE")
        result[name] = value
    return result


def _run_check(args: argparse.Namespace) -> int:
    host = {
        name: parse_switch(value, f"--host {name}")
        for name, value in _pairs(args.host, "--host").items()
    }
    config = Configuration(
        mode=args.mode,
        capabilities=frozenset(args.cap),
        parameters=_pairs(args.param, "--param"),
        runstate=args.runstate,
        was_suspended=args.was_suspended,
        migration=args.migration,
        incoming=args.incoming,
        uri=args.uri,
        cpr_channel=args.cpr_channel,
        devices=tuple(args.device),
        memory=MemoryBackend.parse(args.memory),
        aux_ram_share=args.aux_ram_share,
        host=host,
    )
    model = load_model(args.qemu, path=args.model)
    verdict = check(config, args.command, model=model)
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2))
    else:
        print(_render(verdict))
    return EXIT_ALLOWED if verdict.allowed else EXIT_REFUSED


def _render(verdict: Verdict) -> str:
    steps = " -> ".join(verdict.steps)
    first = verdict.first
    if first is None:
        return f"QEMU {verdict.qemu}: allowed\n  steps: {steps}"
    how = (
        "QEMU aborts: the process is gone"
        if first.aborts
        else "the command succeeds, then the migration fails"
        if first.asynchronous
        else "QMP error"
    )
    lines = [
        f"QEMU {verdict.qemu}: refused at {first.command} ({how})",
        f"  steps:     {steps}",
        f"  QEMU says: {first.error}",
        f"  rule:      {first.rule} ({first.source})",
        f"  to fix:    {first.hint}",
    ]
    if len(verdict.reasons) > 1:
        lines.append("  also violated, in QEMU's order:")
        lines.extend(f"    - {r.command}: {r.error} [{r.rule}]" for r in verdict.reasons[1:])
    return "\n".join(lines)


def _run_log(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        chosen = _chosen(store, args.vm)
        # Every stream is checked whole before the first line is printed.
        for vm in chosen:
            store.verify(vm)
        for vm in chosen:
            for recorded in store.read(vm):
                print(_json_line(recorded) if args.json else _log_line(recorded))
    return EXIT_ALLOWED


def _run_replay(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        vm = _one_vm(store, args.vm)
        end = store.verify(vm)
        at = end if args.at is None else args.at
        if not 0 <= at <= end:
            raise UsageError(f"--at {at} is outside the log of {vm!r}: give 0 to {end}")
        state = initial_state(vm, _first_release(store, vm))
        try:
            # A loop rather than replay(): on an error the read is let go of here, while
            # the store is still open.
            for recorded in store.read(vm, last=at):
                state = fold(state, recorded.event)
        except LogMismatchError as exc:
            exc.add_note(f"in the log of {vm!r} in {os.fspath(store.path)}")
            raise
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
    else:
        print(_render_state(state, end))
    return EXIT_ALLOWED


def _open_store(path: str) -> SQLiteStore:
    """The store at ``path``, read-only: never created, changed or written beside."""
    try:
        return SQLiteStore(path, read_only=True)
    except (StoreNotFoundError, ForeignStoreError) as exc:
        remedy = "give the path of a cprfsm event store (a file the library wrote)"
        raise type(exc)(exc.path, exc.problem, remedy) from None


def _chosen(store: SQLiteStore, vm: str | None) -> list[str]:
    """The VMs (streams) to show: every one, or ``vm`` if the store holds it."""
    streams = store.streams()
    if vm is None:
        return streams
    if vm not in streams:
        if not streams:
            raise _no_vm(store)
        raise UnknownNameError("VM", vm, streams, context=os.fspath(store.path))
    return [vm]


def _one_vm(store: SQLiteStore, vm: str | None) -> str:
    """``vm``, or the only VM of the store."""
    streams = _chosen(store, vm)
    if len(streams) == 1:
        return streams[0]
    if not streams:
        raise _no_vm(store)
    raise UsageError(
        f"{os.fspath(store.path)} holds {len(streams)} VMs ({', '.join(streams)}); "
        "choose one with --vm"
    )


def _no_vm(store: SQLiteStore) -> UsageError:
    return UsageError(f"{os.fspath(store.path)} holds no VM yet: no event was recorded in it")


def _first_release(store: SQLiteStore, vm: str) -> str | None:
    """The release to fold from: the first one the log names, as the live machine held it.

    Only a QemuStarted or QemuUpgraded names a release, and the folded state differs
    only before the first of them; None (the newest modelled) when the log names none.
    """
    for recorded in store.read(vm):
        if isinstance(recorded.event, ev.QemuStarted | ev.QemuUpgraded):
            return recorded.event.qemu_version
    return None


def _fields(recorded: RecordedEvent) -> dict[str, Any]:
    """The event's fields as the store keeps them, in JSON terms."""
    _, _, data = default_registry.encode(recorded.event)
    fields: dict[str, Any] = json.loads(data)
    return fields


def _json_line(recorded: RecordedEvent) -> str:
    event = recorded.event
    return json.dumps(
        {
            "stream": recorded.stream_id,
            "version": recorded.version,
            "event_id": recorded.event_id,
            "recorded_at": recorded.recorded_at.isoformat(),
            "type": event.type_tag,
            "schema_version": event.schema_version,
            "data": _fields(recorded),
        },
        separators=(",", ":"),
    )


def _log_line(recorded: RecordedEvent) -> str:
    stamp = recorded.recorded_at.isoformat(timespec="milliseconds")
    fields = " ".join(f"{name}={_compact(value)}" for name, value in _fields(recorded).items())
    line = f"{recorded.stream_id} {recorded.version:>6} {stamp} {recorded.event.type_tag}"
    return f"{line} {fields}" if fields else line


def _compact(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '="' for c in value):
        return value
    return json.dumps(value, separators=(",", ":"))


def _render_state(state: VmState, end: int) -> str:
    if state.runstate is None:
        exited = f"; last exit: {state.last_exit}" if state.last_exit else ""
        runstate = f"none (no QEMU process{exited})"
    else:
        runstate = state.runstate
    lines = [
        f"phase:          {state.phase}",
        f"vm:             {state.vm}, after event {state.version} of {end}",
        f"runstate:       {runstate}",
        f"was suspended:  {_yes(state.was_suspended)}",
        f"qemu:           {state.qemu_version}",
        f"incarnation:    {state.incarnation}",
        f"host boot:      {state.host_boot}",
        f"mode:           {state.mode}",
        f"capabilities:   {', '.join(sorted(state.capabilities)) or 'none'}",
        f"statuses:       outgoing {state.outgoing_status}, incoming {state.incoming_status}",
        f"saved state:    {_saved(state)}",
    ]
    if state.in_flight is not None:
        operation, target = state.in_flight
        lines.append(f"in flight:      {operation} on {target} (intent recorded, no outcome yet)")
    return "\n".join(lines)


def _saved(state: VmState) -> str:
    saved = state.state_file(state.current_save) if state.current_save else None
    if saved is None:
        return "none"
    flag = ", was suspended" if saved.was_suspended else ""
    validated = ", ".join(sorted(saved.validated)) or "nothing"
    return (
        f"{saved.uri} ({saved.bytes_written} bytes, QEMU {saved.qemu_version}, mode {saved.mode}, "
        f"runstate {saved.runstate}{flag}, validates {validated})"
    )


def _yes(value: bool) -> str:  # noqa: FBT001 - a flag rendered as a word
    return "yes" if value else "no"
