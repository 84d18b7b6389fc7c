"""Benchmark driving a real QEMU through cprfsm against sending the same QMP with ``qemu.qmp``.

The target (one run, anchors measured in the same run): driving QEMU through cprfsm
adds under 1 ms per command over the same QMP command sent with ``qemu.qmp`` directly.

1. stop / cont.  One QEMU 10.0 (the ``loop`` guest, 32 MiB, TCG) with two QMP sockets:

   - anchor: ``qemu.qmp``'s ``QMPClient`` on its own socket, timed the way an asyncio
     caller sees a command: ``await client.execute("stop")`` sent, reply received, and
     the STOP (RESUME) event taken from ``client.events``;
   - cprfsm: ``VirtualMachine.stop()`` / ``.cont()`` over ``QmpExecutor`` on the other
     socket (decide, record nothing for these synchronous commands' intent, execute,
     compare QEMU's report with the model's prediction, record the outcome), once with
     an ``InMemoryStore`` and once with a ``SQLiteStore`` (WAL, synchronous=FULL) on a
     disk-backed directory.  Both VMs share the one executor: the second adopts the
     running QEMU with ``attach()``.

   One QEMU with two monitors rather than two identical QEMUs: both sides talk to the
   same process, main loop and guest, and only one TCG vCPU thread competes for the two
   cores.  QEMU sends every event to every monitor, so before each timed pair the other
   side's events are drained (untimed): the anchor with a ``query-status`` fence, cprfsm
   with ``QmpExecutor.observe(0)``, which reads and discards them.  The pairs of the
   three variants alternate and their order rotates; medians and p90 are per command.

2. A cpr-reboot cycle to a file, a handful of times: ``migrate``, ``quit``, a new QEMU
   with ``-incoming defer``, ``migrate-set-parameters`` (mode cpr-reboot),
   ``migrate-set-capabilities`` (events), ``migrate-incoming``.  The anchor sends the same
   commands to its own QEMU with ``qemu.qmp`` and waits for what says each is done:
   ``MIGRATION completed``, the process's exit, the QMP greeting of a QEMU that connects
   to the anchor's listening socket (no polling), the replies.

Skips (exit 0) when ``qemu.qmp`` or a QEMU 10.0 is missing; reports MISS when stop or cont over
the ``InMemoryStore`` misses the target.  ``--profile`` also profiles cprfsm's stop/cont.

Run: ``python bench/bench_qmp.py [--pairs N] [--cycles N] [--profile]``.
"""

# ruff: noqa: T201, INP001 - a script that prints, not a package module

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from cprfsm.executor import VmDefinition
from cprfsm.machine import VirtualMachine
from cprfsm.store import InMemoryStore, SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

    from qemu.qmp import QMPClient

    from cprfsm.qmp import QmpExecutor

_QEMU = "10.0"
_TARGET_MS = 1.0
_RAM = 32 * 2**20
_WARMUP = 20
_MIGRATION = "MIGRATION"
_HEADER = (
    f"{'benchmark':<30} {'cprfsm':>8} {'p90':>8} {'anchor':>8} {'p90':>8} {'unit':<4} "
    f"{'added':>9} {'ratio':>7}  {'target':<8} result"
)


@attrs.frozen(kw_only=True)
class Row:
    """One command: cprfsm's and the anchor's samples, in seconds."""

    name: str
    ours: tuple[float, ...]
    anchor: tuple[float, ...]
    #: Microseconds ("us") or milliseconds ("ms") in the table.
    unit: str = "us"
    #: The most cprfsm may add, in ms: 1 per command.
    target_ms: float = _TARGET_MS

    @property
    def added_ms(self) -> float:
        """What cprfsm adds per command: the difference of the medians, in ms."""
        return (statistics.median(self.ours) - statistics.median(self.anchor)) * 1e3

    @property
    def ratio(self) -> float:
        """cprfsm's median divided by the anchor's."""
        return statistics.median(self.ours) / statistics.median(self.anchor)

    @property
    def passed(self) -> bool:
        """Whether the added cost is under the target."""
        return self.added_ms < self.target_ms

    def line(self) -> str:
        """The row of the table, times in microseconds or milliseconds."""
        scale = 1e6 if self.unit == "us" else 1e3
        cells = [
            _number(statistics.median(self.ours) * scale),
            _number(_p90(self.ours) * scale),
            _number(statistics.median(self.anchor) * scale),
            _number(_p90(self.anchor) * scale),
        ]
        return (
            f"{self.name:<30} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} {cells[3]:>8} "
            f"{self.unit:<4} {self.added_ms:>6.2f} ms {self.ratio:>6.2f}x  "
            f"{f'< {self.target_ms:g} ms':<8} "
            f"{'PASS' if self.passed else 'MISS'}"
        )


def _p90(samples: tuple[float, ...]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[-1]


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


# --- the anchor: qemu.qmp, straight ------------------------------------------------------------


class Direct:
    """A ``QMPClient`` on a private event loop: what a caller of ``qemu.qmp`` does, timed inside.

    Each timed coroutine measures itself with ``perf_counter`` around the awaits, so the
    loop's own entry and exit (which only this synchronous harness needs) are not counted.
    """

    def __init__(self, name: str) -> None:
        """A client not connected yet."""
        from qemu.qmp import QMPClient  # noqa: PLC0415 - optional, checked in main

        self.loop = asyncio.new_event_loop()
        self.client: QMPClient = QMPClient(name)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the private loop."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    async def fence(self) -> None:
        """Read everything QEMU sent before now and drop the events (not timed)."""
        await self.client.execute("query-status")
        self.client.events.clear()

    async def until(self, event: str, status: str | None = None) -> None:
        """Consume events until ``event`` (with ``status`` for MIGRATION) arrives."""
        while True:
            message = await self.client.events.get()
            if message["event"] == event and (
                status is None or message.get("data", {}).get("status") == status
            ):
                return

    async def timed(self, command: str, event: str, arguments: dict[str, Any] | None) -> float:
        """Seconds from sending ``command`` to its reply and ``event`` consumed."""
        start = time.perf_counter()
        await self.client.execute(command, arguments)
        if event == _MIGRATION:
            await self.until(event, "completed")
        elif event:
            await self.until(event)
        return time.perf_counter() - start

    def close(self) -> None:
        """Disconnect and close the loop."""
        with contextlib.suppress(Exception):
            self.run(self.client.disconnect())
        self.loop.close()


def _direct_pair(direct: Direct) -> tuple[float, float]:
    async def pair() -> tuple[float, float]:
        await direct.fence()
        return (
            await direct.timed("stop", "STOP", None),
            await direct.timed("cont", "RESUME", None),
        )

    result: tuple[float, float] = direct.run(pair())
    return result


# --- cprfsm ----------------------------------------------------------------------------------


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _cprfsm_pair(vm: VirtualMachine, executor: QmpExecutor) -> tuple[float, float]:
    executor.observe(0)  # drop what the anchor's commands made QEMU send here (not timed)
    return _timed(vm.stop), _timed(vm.cont)


# --- 1. stop / cont ----------------------------------------------------------------------------


def _stop_cont(work: Path, store_dir: Path, pairs: int, *, profile: bool) -> list[Row]:
    from cprfsm.qmp import Guest, QmpExecutor  # noqa: PLC0415 - optional, checked in main

    anchor_socket = work / "anchor.sock"
    definition = VmDefinition(
        ram_size=_RAM, extra_args=("-qmp", f"unix:{anchor_socket},server=on,wait=off")
    )
    samples: dict[str, list[float]] = {}
    with (
        QmpExecutor(work / "q", guest=Guest.LOOP) as executor,
        SQLiteStore(store_dir / "bench.sqlite") as sqlite,
    ):
        memory_vm = VirtualMachine(
            "bench-memory", store=InMemoryStore(), executor=executor, definition=definition
        )
        memory_vm.start()
        sqlite_vm = VirtualMachine(
            "bench-sqlite", store=sqlite, executor=executor, definition=definition
        )
        sqlite_vm.attach()
        direct = Direct("anchor")
        direct.run(direct.client.connect(str(anchor_socket)))
        variants: list[tuple[str, Callable[[], tuple[float, float]]]] = [
            ("anchor", lambda: _direct_pair(direct)),
            ("memory", lambda: _cprfsm_pair(memory_vm, executor)),
            ("sqlite", lambda: _cprfsm_pair(sqlite_vm, executor)),
        ]
        try:
            for index in range(_WARMUP + pairs):
                shift = index % len(variants)
                for name, run in variants[shift:] + variants[:shift]:
                    stop, cont = run()
                    if index >= _WARMUP:
                        samples.setdefault(f"{name} stop", []).append(stop)
                        samples.setdefault(f"{name} cont", []).append(cont)
            if profile:
                _profile(
                    "cprfsm stop/cont, InMemoryStore, 200 pairs",
                    lambda: [_cprfsm_pair(memory_vm, executor) for _ in range(200)],
                )
        finally:
            direct.close()
            sqlite_vm.close()
            memory_vm.close()
    return [
        Row(
            name=f"{command}, {label}",
            ours=tuple(samples[f"{store} {command}"]),
            anchor=tuple(samples[f"anchor {command}"]),
        )
        for store, label in (("memory", "InMemoryStore"), ("sqlite", "SQLiteStore"))
        for command in ("stop", "cont")
    ]


# --- 2. cpr-reboot cycle -------------------------------------------------------------------------

_CYCLE = (
    "migrate",
    "quit",
    "start -incoming",
    "migrate-set-parameters",
    "migrate-set-capabilities",
    "migrate-incoming",
)


def _cprfsm_cycle(vm: VirtualMachine, uri: str) -> dict[str, float]:
    return {
        "migrate": _timed(lambda: vm.migrate(uri)),
        "quit": _timed(vm.quit),
        "start -incoming": _timed(lambda: vm.start(incoming=True)),
        "migrate-set-parameters": _timed(lambda: vm.set_parameters(mode="cpr-reboot")),
        "migrate-set-capabilities": _timed(lambda: vm.set_capabilities({"events": True})),
        "migrate-incoming": _timed(lambda: vm.migrate_incoming(uri)),
    }


class DirectQemu:
    """The anchor's own QEMU: the executor's command line, its QMP socket turned around.

    QEMU connects to a socket the anchor listens on (as ``qemu.machine`` does), so a start
    waits for nothing but QEMU.
    """

    def __init__(self, work: Path, qemu: str) -> None:
        """Where the anchor's files go, and the QEMU binary."""
        from cprfsm.qmp import Guest, write_boot_image  # noqa: PLC0415 - optional

        self.work = work
        self.qemu = qemu
        work.mkdir(parents=True, exist_ok=True)
        self.boot = write_boot_image(Guest.LOOP, work / "boot.img")
        self.process: subprocess.Popen[bytes] | None = None
        self.direct: Direct | None = None

    def argv(self, socket: Path, *, incoming: bool) -> list[str]:
        """The executor's argv for the same definition, QEMU connecting out to ``socket``."""
        from cprfsm.qmp import command_line  # noqa: PLC0415 - optional

        argv = command_line(
            VmDefinition(ram_size=_RAM),
            workdir=self.work,
            qmp_socket=socket,
            boot_image=self.boot,
            incoming=incoming,
            qemu=self.qemu,
        )
        return [f"unix:{socket}" if arg.startswith("unix:") else arg for arg in argv]

    def start(self, *, incoming: bool) -> float:
        """Seconds to spawn QEMU and negotiate QMP with it."""
        socket = self.work / "anchor.sock"
        socket.unlink(missing_ok=True)
        direct = Direct("anchor-cycle")
        argv = self.argv(socket, incoming=incoming)

        async def start() -> float:
            began = time.perf_counter()
            await direct.client.start_server(str(socket))
            self.process = subprocess.Popen(  # noqa: S603, ASYNC220 - our argv; timed as is
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
            )
            await direct.client.accept()
            return time.perf_counter() - began

        elapsed: float = direct.run(start())
        self.direct = direct
        return elapsed

    def command(self, command: str, event: str = "", **arguments: Any) -> float:
        """Seconds for one QMP command, waiting for ``event`` (MIGRATION: completed)."""
        direct = self.direct
        assert direct is not None

        async def timed() -> float:
            await direct.fence()
            return await direct.timed(command, event, arguments or None)

        elapsed: float = direct.run(timed())
        return elapsed

    def quit(self) -> float:
        """Seconds from ``quit`` sent to SHUTDOWN seen and the process reaped."""
        direct, process = self.direct, self.process
        assert direct is not None
        assert process is not None

        async def quit_() -> float:
            await direct.fence()
            began = time.perf_counter()
            await direct.client.execute("quit")
            await direct.until("SHUTDOWN")
            with contextlib.suppress(Exception):
                await direct.client.disconnect()
            process.wait()
            return time.perf_counter() - began

        elapsed: float = direct.run(quit_())
        direct.loop.close()
        self.direct = self.process = None
        return elapsed

    def close(self) -> None:
        """Kill whatever is left."""
        if self.direct is not None:
            self.direct.close()
        if self.process is not None:
            self.process.kill()
            self.process.wait()


_EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}


def _direct_cycle(qemu: DirectQemu, uri: str) -> dict[str, float]:
    return {
        "migrate": qemu.command("migrate", _MIGRATION, uri=uri),
        "quit": qemu.quit(),
        "start -incoming": qemu.start(incoming=True),
        "migrate-set-parameters": qemu.command("migrate-set-parameters", mode="cpr-reboot"),
        "migrate-set-capabilities": qemu.command("migrate-set-capabilities", **_EVENTS_ON),
        "migrate-incoming": qemu.command("migrate-incoming", _MIGRATION, uri=uri),
    }


def _cpr_cycles(work: Path, cycles: int) -> list[Row]:
    from cprfsm.qmp import Guest, QmpExecutor  # noqa: PLC0415 - optional, checked in main

    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    executor = QmpExecutor(work / "c", guest=Guest.LOOP)
    direct = DirectQemu(work / "d", executor.qemu)
    with VirtualMachine(
        "bench-cpr",
        store=InMemoryStore(),
        executor=executor,
        definition=VmDefinition(ram_size=_RAM),
    ) as vm:
        try:
            vm.start()
            vm.set_parameters(mode="cpr-reboot")
            vm.set_capabilities({"events": True})
            direct.start(incoming=False)
            direct.command("migrate-set-parameters", mode="cpr-reboot")
            direct.command("migrate-set-capabilities", **_EVENTS_ON)
            for cycle in range(cycles + 1):  # the first is a warm-up
                sides = [
                    (ours, lambda c=cycle: _cprfsm_cycle(vm, f"file:{work / 'c'}/{c}.state")),
                    (
                        theirs,
                        lambda c=cycle: _direct_cycle(direct, f"file:{work / 'd'}/{c}.state"),
                    ),
                ]
                for kept, run in sides if cycle % 2 else sides[::-1]:
                    for command, seconds in run().items():
                        if cycle:
                            kept.setdefault(command, []).append(seconds)
                for side in ("c", "d"):
                    (work / side / f"{cycle}.state").unlink(missing_ok=True)
        finally:
            direct.close()
    rows = [
        Row(name=name, ours=tuple(ours[name]), anchor=tuple(theirs[name]), unit="ms")
        for name in _CYCLE
    ]
    whole = Row(
        name="whole cycle (6 commands)",
        unit="ms",
        target_ms=_TARGET_MS * len(_CYCLE),
        ours=tuple(map(sum, zip(*(ours[name] for name in _CYCLE), strict=True))),
        anchor=tuple(map(sum, zip(*(theirs[name] for name in _CYCLE), strict=True))),
    )
    return [*rows, whole]


# --- running -----------------------------------------------------------------------------------


def _profile(title: str, action: Callable[[], object]) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(action)
    for key in ("tottime", "cumulative"):
        print(f"\n--- profile: {title} (top 25 by {key}) ---")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(key).print_stats(25)


def _why_skip() -> str | None:
    """Why this benchmark cannot run here, or None."""
    try:
        import qemu.qmp  # noqa: F401, PLC0415 - the optional dependency
    except ImportError:
        return "qemu.qmp is not installed (pip install 'cprfsm[qmp]')"
    from cprfsm.qmp import default_qemu  # noqa: PLC0415 - needs qemu.qmp

    binary = default_qemu()
    if shutil.which(binary) is None:
        return f"{binary} is not on PATH (set CPRFSM_QEMU)"
    version = subprocess.run(  # noqa: S603 - the configured QEMU binary
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"version (\d+\.\d+)", version)
    if found is None or found.group(1) != _QEMU:
        return f"{binary} is not QEMU {_QEMU} ({version.splitlines()[0] if version else '?'})"
    return None


@contextlib.contextmanager
def _directories() -> Iterator[tuple[Path, Path]]:
    """A short work directory (it holds unix sockets) and a disk-backed one for the store."""
    work = Path(tempfile.mkdtemp(prefix="cprfsm-bq-"))
    store = Path(tempfile.mkdtemp(prefix="cprfsm-bq-", dir="/var/tmp"))
    try:
        yield work, store
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


def main() -> int:
    """Run both benchmarks and print the table (a missed target says MISS; the exit is 0)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="stop/cont pairs per variant")
    parser.add_argument("--cycles", type=int, default=5, help="cpr-reboot cycles per side")
    parser.add_argument("--profile", action="store_true", help="profile cprfsm's stop/cont")
    options = parser.parse_args()
    reason = _why_skip()
    if reason is not None:
        print(f"bench_qmp: skipped: {reason}")
        return 0
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    started = time.perf_counter()
    with _directories() as (work, store):
        rows = _stop_cont(work, store, options.pairs, profile=options.profile)
        cycle = _cpr_cycles(work, options.cycles)
    print(
        f"\nQEMU over QMP: {options.pairs} stop/cont pairs and {options.cycles} cpr-reboot "
        f"cycles per side, interleaved, {time.perf_counter() - started:.0f} s in all "
        f"(pid {os.getpid()})\n"
    )
    print(_HEADER)
    for row in rows:
        print(row.line())
    print("cpr-reboot cycle to a file:")
    for row in cycle:
        print(row.line())
    # The target: stop and cont over the in-memory store.  The SQLite rows add a
    # durable commit per command (an fsync), the cycle's rows are reported alongside.
    missed = [row.name for row in rows if "InMemory" in row.name and not row.passed]
    verdict = f"MISS: {', '.join(missed)}" if missed else "PASS"
    print(f"\ntarget (under 1 ms added per command, in-memory store): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
