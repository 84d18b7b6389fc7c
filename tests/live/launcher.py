"""Start, drive and always clean up qemu-system-x86_64 processes for the harness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from cprfsm.qmp import Guest, write_boot_image

from .qmp import JSON, QMPClient

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

QEMU_SYSTEM = os.environ.get("CPRFSM_QEMU", "qemu-system-x86_64")
QEMU_IMG = os.environ.get("CPRFSM_QEMU_IMG", "qemu-img")
MACHINE = "pc"
ACCEL = "tcg"
RAM_SIZE = "32M"
EXPECTED_VERSION = "10.0.2"

MEMORY_KINDS = ("ram", "ram,share=off", "ram,share=on", "memfd,share=on", "file,share=on")
STARTING_RUNSTATES = ("running", "paused", "prelaunch", "suspended", "postmigrate", "inmigrate")
# Statuses a migration can sit in for good; anything else is still moving (or stuck).
SETTLED_STATUSES = frozenset(
    {"none", "completed", "failed", "cancelled", "pre-switchover", "colo", "postcopy-paused"}
)
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

T = TypeVar("T")


class QEMUStartError(RuntimeError):
    """QEMU exited or never opened its QMP socket."""


def qemu_missing_reason() -> str | None:
    """Say why the harness cannot run here, or None when both QEMU binaries are present."""
    for binary in (QEMU_SYSTEM, QEMU_IMG):
        if shutil.which(binary) is None:
            return f"{binary} not found on PATH (set CPRFSM_QEMU / CPRFSM_QEMU_IMG)"
    return None


def qemu_version() -> str:
    """Return the first line of `qemu-system-x86_64 --version`."""
    out = subprocess.run(
        [QEMU_SYSTEM, "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.splitlines()[0]


def wait_until(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` every 10 ms until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


@dataclass(frozen=True)
class VMConfig:
    """Everything that changes the QEMU command line of one VM."""

    guest: Guest = Guest.LOOP
    start_paused: bool = False
    incoming: tuple[str, ...] = ()
    memory: str = "ram"
    aux_ram_share: bool = False
    device: str = ""

    def with_incoming(self, *incoming: str) -> VMConfig:
        """Return the same machine with these `-incoming` arguments."""
        return VMConfig(
            self.guest, self.start_paused, incoming, self.memory, self.aux_ram_share, self.device
        )


def config_for(runstate: str, **overrides: Any) -> VMConfig:
    """Return a VM configuration that can reach `runstate` (see `enter_runstate`)."""
    if runstate not in STARTING_RUNSTATES:
        raise ValueError(f"cannot start a VM in runstate {runstate!r}")
    settings: dict[str, Any] = {
        "guest": Guest.SUSPEND if runstate == "suspended" else Guest.LOOP,
        "start_paused": runstate == "prelaunch",
        "incoming": ("defer",) if runstate == "inmigrate" else (),
    }
    settings.update(overrides)
    return VMConfig(**settings)


def unix_listening(path: Path) -> bool | None:
    """Return True once a process listens on the unix socket `path`, else None.

    The socket file appears at bind(), before listen(), so its existence is not enough;
    connecting to probe would use up a cpr channel's only accept.  /proc/net/unix shows
    the listening flag (__SO_ACCEPTCON, 0x10000) instead.
    """
    with Path("/proc/net/unix").open(encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return None


def unix_channel(channel_type: str, path: Path) -> JSON:
    """Return a MigrationChannel of `channel_type` on a unix socket at `path`."""
    return {
        "channel-type": channel_type,
        "addr": {"transport": "socket", "type": "unix", "path": str(path)},
    }


class VM:
    """One qemu-system-x86_64 process; use as a context manager so it is always killed."""

    def __init__(self, config: VMConfig, workdir: Path, name: str = "source") -> None:
        """Prepare (but do not start) a VM whose files live in `workdir`."""
        self.config = config
        self.workdir = workdir
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.log_path = workdir / f"{name}.log"
        self.qmp = QMPClient(self.qmp_path)
        self._proc: subprocess.Popen[bytes] | None = None

    def command_line(self) -> list[str]:
        """Return the full argv for this VM."""
        cfg = self.config
        boot = self.workdir / f"boot-{cfg.guest.value}.img"
        if not boot.exists():
            write_boot_image(cfg.guest, boot)
        machine = MACHINE
        argv = [QEMU_SYSTEM, "-accel", ACCEL, "-m", RAM_SIZE, "-nodefaults"]
        argv += ["-display", "none", "-no-user-config"]
        argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        argv += ["-drive", f"file={boot},format=raw,if=ide,index=0,node-name=boot"]
        if cfg.memory != "ram":
            backend, share = cfg.memory.split(",")
            props = f"id=ram0,size={RAM_SIZE},{share}"
            if backend == "file":
                props += f",mem-path={self.workdir / 'guest-ram'}"
            argv += ["-object", f"memory-backend-{backend},{props}"]
            machine += ",memory-backend=ram0"
        if cfg.aux_ram_share:
            machine += ",aux-ram-share=on"
        argv += ["-machine", machine]
        if cfg.device:
            image = self.workdir / f"extra.{cfg.device}"
            if not image.exists():
                create_image(cfg.device, image)
            argv += [
                "-drive",
                f"file={image},format={cfg.device},if=ide,index=1,node-name=extra",
            ]
        if cfg.start_paused:
            argv.append("-S")
        for incoming in cfg.incoming:
            argv += ["-incoming", incoming]
        return argv

    def start(self, *, connect: bool = True, timeout: float = 20.0) -> Self:
        """Start QEMU in its own process group; connect QMP unless told not to yet."""
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if connect:
            self.connect(timeout)
        return self

    def connect(self, timeout: float = 20.0) -> None:
        """Wait for the QMP socket (failing fast if QEMU died) and negotiate."""

        def listening() -> bool | None:
            if self.qmp_path.exists():
                return True
            if self.returncode() is not None:
                raise QEMUStartError(f"{self.name} QEMU exited early:\n{self.log()}")
            return None

        wait_until(listening, timeout, f"{self.name} QMP socket")
        self.qmp.connect(timeout)

    def returncode(self) -> int | None:
        """Return QEMU's exit status, or None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def log(self) -> str:
        """Return everything QEMU printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def messages(self) -> list[str]:
        """Return QEMU's printed lines without the `qemu-system-x86_64: ` prefix."""
        prefix = f"{Path(QEMU_SYSTEM).name}: "
        return [line.removeprefix(prefix) for line in self.log().splitlines() if line.strip()]

    def runstate(self) -> str:
        """Return `query-status` status."""
        return str(self.qmp.execute("query-status")["status"])

    def migration(self) -> JSON:
        """Return `query-migrate` (an empty object means status `none`)."""
        info: JSON = self.qmp.execute("query-migrate")
        return info

    def kill(self) -> None:
        """Kill QEMU and every child it spawned (exec: migrations), then reap it."""
        self.qmp.close()
        if self._proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        self._proc = None

    def __enter__(self) -> Self:
        """Return self; the caller starts it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill the process whatever happened."""
        self.kill()


def create_image(fmt: str, path: Path) -> None:
    """Create a 1 MiB image of format `fmt` with qemu-img."""
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", fmt, str(path), "1M"],
        check=True,
        capture_output=True,
        timeout=30,
    )


@contextmanager
def workdir() -> Iterator[Path]:
    """Yield a fresh temporary directory (short path: it holds unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="cprfsm-qemu-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_runstate(vm: VM, runstate: str, timeout: float = 20.0) -> None:
    """Wait until `query-status` reports `runstate`."""
    wait_until(lambda: True if vm.runstate() == runstate else None, timeout, runstate)


def enter_runstate(vm: VM, runstate: str, timeout: float = 20.0) -> None:
    """Drive a VM started from `config_for(runstate)` into `runstate`."""
    if runstate == "paused":
        vm.qmp.execute("stop")
    elif runstate == "suspended":
        vm.qmp.wait_event("SUSPEND", timeout=timeout)
    elif runstate == "postmigrate":
        vm.qmp.execute("migrate", uri=f"file:{vm.workdir / 'postmigrate.state'}")
        wait_until(
            lambda: True if vm.migration().get("status") == "completed" else None,
            timeout,
            "the migration that leads to postmigrate",
        )
    wait_runstate(vm, runstate, timeout)


def settle_migration(vm: VM, timeout: float) -> JSON:
    """Wait until the outgoing migration settles (or `timeout` passes); return query-migrate.

    A terminal status is only reported once QEMU has also left `finish-migrate` and, for
    `failed`, filled in `error-desc`, since both lag a moment behind the status.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = vm.migration()
        status = info.get("status", "none")
        if status in SETTLED_STATUSES:
            done = status not in TERMINAL_STATUSES or (
                vm.runstate() != "finish-migrate" and (status != "failed" or "error-desc" in info)
            )
            if done:
                return info
        if time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def dump_json(value: object) -> str:
    """Serialise a QMP argument for the command line."""
    return json.dumps(value, separators=(",", ":"))
