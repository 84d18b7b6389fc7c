"""The ``cprfsm`` command: the library's answers for people (default) and scripts (--json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, NoReturn

from cprfsm.exceptions import CprFsmError, UsageError
from cprfsm.legality import Configuration, MemoryBackend, Verdict, _switch, check
from cprfsm.model import COMMANDS, load_model

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

EXIT_ALLOWED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors go through the same path as every other usage error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 allowed, 1 refused, 2 usage error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        result: int = args.run(args)
    except SystemExit as exc:  # --help and --version end the parse
        return exc.code if isinstance(exc.code, int) else EXIT_ALLOWED
    except CprFsmError as exc:
        print(f"cprfsm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cprfsm", description=__doc__)
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
        choices=("none", "deferred", "started"),
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
    return parser


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
        name: _switch(value, f"--host {name}")
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
    how = "the command succeeds, then the migration fails" if first.asynchronous else "QMP error"
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
