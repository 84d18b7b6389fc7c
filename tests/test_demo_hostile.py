"""Hostile paths, resources and reports: a typed error and exit 2, or a right answer, always."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hostile import within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprfsm import _files
from cprfsm.cli import main
from cprfsm.demo import DemoOptions, run_demo
from cprfsm.exceptions import PortError
from cprfsm.executor import VmDefinition
from cprfsm.machine import VirtualMachine
from cprfsm.simulator import Simulator
from cprfsm.statefile import StateFileReader
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
SMALL = "1M"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in-process within 20 s; return exit status, stdout and stderr."""
    with within(20):
        status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def demo(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> tuple[int, str, str]:
    """``cprfsm demo --backend sim --ram 1M --store STORE ARGV...``."""
    return cli(capsys, "demo", "--backend", "sim", "--ram", SMALL, "--store", str(store), *argv)


def refused(capsys: pytest.CaptureFixture[str], store: Path, *argv: str) -> str:
    """Run the demo; assert exit 2 with one line on stderr and nothing on stdout; the line."""
    status, out, err = demo(capsys, store, *argv)
    assert (status, out) == (2, ""), err
    assert err.startswith("cprfsm: error: ")
    assert err.count("\n") == 1
    return err


def subprocess_cli(*argv: str, cwd: Path, limit: tuple[int, int] | None = None) -> Any:
    """``python -m cprfsm ARGV`` in ``cwd``, optionally under one resource limit."""

    def limited() -> None:
        if limit is not None:
            resource.setrlimit(limit[0], (limit[1], limit[1]))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CPRFSM_QEMU": "no-such-qemu"}
    return subprocess.run(
        [sys.executable, "-m", "cprfsm", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=limited,
    )


def tree(root: Path) -> set[Path]:
    """Every path under ``root``."""
    return set(root.rglob("*"))


class TestPaths:
    """Class 5: planted symlinks, devices, FIFOs, escaping names, commas and name races."""

    def test_symlink_planted_at_guest_ram_keeps_its_target(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A symlink at <store>.d/demo-1/guest-ram is not written through; the demo still runs."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        planted = tmp_path / "s.d" / "demo-1" / "guest-ram"
        planted.parent.mkdir(parents=True)
        planted.symlink_to(victim)
        status, out, _ = demo(capsys, tmp_path / "s.sqlite", "--json")
        assert status == 0
        assert json.loads(out)["vm"] == "demo-2"
        assert victim.read_bytes() == b"precious"
        assert planted.is_symlink()

    def test_symlink_at_an_explicit_ram_path_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--memory file,share=on,path=SYMLINK is exit 2 naming the symlink; the target is kept."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        (tmp_path / "link").symlink_to(victim)
        err = refused(
            capsys, tmp_path / "s.sqlite", "--memory", f"file,share=on,path={tmp_path / 'link'}"
        )
        assert "is a symbolic link" in err
        assert victim.read_bytes() == b"precious"

    def test_disk_image_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink planted where a disk image goes fails the start; its target is untouched."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        image = tmp_path / "sim" / "disks" / "qcow20.qcow2"
        image.parent.mkdir(parents=True)
        image.symlink_to(victim)
        with Simulator(tmp_path / "sim") as sim, pytest.raises(PortError, match="symbolic link"):
            sim.ports().host.start_qemu(VmDefinition(ram_size=2**20, devices=("qcow2",)))
        assert victim.read_bytes() == b"precious"
        dangling = tmp_path / "sim2" / "disks" / "qcow20.qcow2"
        dangling.parent.mkdir(parents=True)
        dangling.symlink_to(tmp_path / "created-through-link")
        with Simulator(tmp_path / "sim2") as sim, pytest.raises(PortError):
            sim.ports().host.start_qemu(VmDefinition(ram_size=2**20, devices=("qcow2",)))
        assert not (tmp_path / "created-through-link").exists()

    @pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
    def test_char_device_uri_is_refused_and_kept(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
    ) -> None:
        """--uri file:<char device> is exit 2; the device node is still a device."""
        err = refused(capsys, tmp_path / "s.sqlite", "--uri", f"file:{device}")
        assert "is a character device" in err
        assert Path(device).is_char_device()

    def test_fifo_uri_is_refused_without_hanging(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A FIFO as the state file is exit 2 at once; the reader never waits on one either."""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        err = refused(capsys, tmp_path / "s.sqlite", "--uri", f"file:{fifo}")
        assert "is a FIFO" in err
        with within(2), pytest.raises(PortError, match="FIFO"):
            StateFileReader(fifo)
        assert fifo.is_fifo()

    @pytest.mark.parametrize(
        ("option", "value", "problem"),
        [
            ("--device", "qcow2,node=../../../x", "node name '../../../x'"),
            ("--memory", "file,share=on,id=../../x", "memory backend id '../../x'"),
            ("--uri", "file:../../../x", "leaves the work folder"),
            ("--memory", "file,share=on,path=../../../x", "leaves the work folder"),
        ],
    )
    def test_escaping_names_write_nothing_outside(  # noqa: PLR0913, PLR0917 - one per parameter
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        option: str,
        value: str,
        problem: str,
    ) -> None:
        """Names that climb out of the work folder are exit 2 and nothing appears outside."""
        deep = tmp_path / "a" / "b" / "c"
        deep.mkdir(parents=True)
        monkeypatch.chdir(deep)
        err = refused(capsys, Path("s.sqlite"), option, value)
        assert problem in err
        assert tree(tmp_path) - tree(deep) == {tmp_path / "a", tmp_path / "a" / "b", deep}

    def test_a_comma_in_the_store_is_a_path_not_an_option(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--store a,share=off,b.sqlite keeps share=on and puts the RAM file in its folder."""
        store = tmp_path / "a,share=off,b.sqlite"
        status, out, _ = demo(capsys, store, "--json")
        assert status == 0
        assert json.loads(out)["outcome"] == "restored"
        ram = tmp_path / "a,share=off,b.d" / "demo-1" / "guest-ram"
        assert ram.stat().st_size == 2**20
        with SQLiteStore(store, read_only=True) as opened:
            memory = next(
                r.event.memory for r in opened.read("demo-1") if hasattr(r.event, "memory")
            )
        assert memory == f"file,share=on,path={str(ram).replace(',', ',,')}"

    def test_concurrent_demos_take_different_names(self, tmp_path: Path) -> None:
        """Four demos started together on one store run as four different VMs."""
        argv = ["demo", "--backend", "sim", "--ram", SMALL, "--store", "s.sqlite", "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "cprfsm", *argv],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reports.append(json.loads(out))
        assert sorted(r["vm"] for r in reports) == ["demo-1", "demo-2", "demo-3", "demo-4"]
        assert {r["outcome"] for r in reports} == {"restored"}

    def test_a_store_holding_only_demo_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A store whose only VM is demo-2 gets demo-1, then demo-3: no run continues another's."""
        store = tmp_path / "s.sqlite"
        with SQLiteStore(store) as opened, Simulator(tmp_path / "other") as sim:
            vm = VirtualMachine(
                "demo-2",
                store=opened,
                executor=sim.executor(),
                definition=VmDefinition(ram_size=2**20),
            )
            vm.start()
            vm.quit()
            vm.close()
        capsys.readouterr()  # the VM's own log lines (structlog's defaults print them)
        names = []
        for _ in range(2):
            status, out, _ = demo(capsys, store, "--json")
            assert status == 0
            names.append(json.loads(out)["vm"])
        assert names == ["demo-1", "demo-3"]


class TestResources:
    """Class 6: sizes, memory, ulimit and free space are checked first; no SIGBUS, no traceback."""

    def test_absurd_size(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--ram 99999999999999999999 is exit 2 naming the limit, not an OverflowError."""
        status, out, err = cli(
            capsys, "demo", "--store", str(tmp_path / "s.sqlite"), "--ram", "9" * 20
        )
        assert (status, out) == (2, "")
        assert "at most 1.0 PiB" in err
        assert not (tmp_path / "s.sqlite").exists()

    def test_more_ram_than_the_host_has(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """--ram 30G of anonymous RAM on a host with 1 GiB available names both figures."""
        monkeypatch.setattr(_files, "memory_available", lambda: 2**30)
        status, out, err = cli(
            capsys, "demo", "--backend", "sim", "--store", str(tmp_path / "s.sqlite"),
            "--ram", "30G", "--memory", "ram",
        )  # fmt: skip
        assert (status, out) == (2, "")
        assert "needs 30.0 GiB, but this host has 1.0 GiB of memory available" in err
        assert not (tmp_path / "s.sqlite").exists()

    def test_under_ulimit_v(self, tmp_path: Path) -> None:
        """Under ulimit -v the demo says so with the figure: exit 2, one line, no traceback."""
        done = subprocess_cli(
            "demo", "--backend", "sim", "--store", "s.sqlite", "--ram", "4G",
            cwd=tmp_path, limit=(resource.RLIMIT_AS, 2**31),
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "ulimit -v" in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1

    def test_under_ulimit_f(self, tmp_path: Path) -> None:
        """A RAM file larger than ulimit -f is refused first, not killed by SIGXFSZ or EFBIG."""
        done = subprocess_cli(
            "demo", "--backend", "sim", "--store", "s.sqlite", "--ram", "4M",
            cwd=tmp_path, limit=(resource.RLIMIT_FSIZE, 2**20),
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "ulimit -f" in done.stderr
        assert "Traceback" not in done.stderr

    def test_no_room_for_ram_file_and_state_file(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Both files on one filesystem are counted together; the error names the figures."""
        monkeypatch.setattr(_files, "free_space", lambda _path: (3 * 2**20, 1))
        err = refused(capsys, tmp_path / "s.sqlite", "--ram", "2M")
        assert "the guest RAM file" in err
        assert "and the state file" in err
        assert "needs 5.0 MiB, but their filesystem has 3.0 MiB free" in err

    def test_full_filesystem_is_enospc_not_sigbus(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When allocation fails the demo reports it; the half-made RAM file is removed."""

        def full(_fd: int, _offset: int, _length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
        report = run_demo(DemoOptions(store=tmp_path / "s.sqlite", ram=2**20))
        assert report.outcome == "failed"
        assert report.error is not None
        assert "No space left on device" in report.error
        assert not (tmp_path / "s.d" / "demo-1" / "guest-ram").exists()

    def test_small_tmpfs_for_real(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On a real 4 MiB tmpfs: the check refuses 16M; forced past it, ENOSPC, never SIGBUS."""
        mount = Path(tempfile.mkdtemp(prefix="cprfsm-tmpfs-"))
        try:
            if os.geteuid() != 0 or shutil.which("mount") is None:
                pytest.skip("mounting a tmpfs needs root")
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                capture_output=True,
                check=False,
            )
            if done.returncode:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr!r}")
            try:
                err = refused(capsys, mount / "s.sqlite", "--ram", "16M")
                assert "their filesystem has" in err
                monkeypatch.setattr("cprfsm.demo.check_resources", lambda *_: None)
                report = run_demo(DemoOptions(store=mount / "s.sqlite", ram=16 * 2**20))
                assert report.outcome == "failed"
                assert report.error is not None
                assert "No space left on device" in report.error
                assert not (mount / "s.d" / "demo-1" / "guest-ram").exists()
            finally:
                subprocess.run(["umount", str(mount)], check=False)
        finally:
            with contextlib.suppress(OSError):
                mount.rmdir()


class TestReports:
    """Class 7: the report says the data is lost whenever the guest's data did not come back."""

    @pytest.fixture
    def shm_state(self) -> Iterator[Path]:
        """A state file path on /dev/shm (tmpfs), removed afterwards."""
        path = Path("/dev/shm") / f"cprfsm-hostile-{uuid.uuid4().hex}.state"
        yield path
        path.unlink(missing_ok=True)

    def test_reboot_wipes_the_state_file_on_tmpfs(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], shm_state: Path
    ) -> None:
        """--reboot with the only copy on tmpfs: the restore fails, data_lost is true (exit 1)."""
        status, out, _ = demo(
            capsys, tmp_path / "s.sqlite", "--reboot", "--uri", f"file:{shm_state}", "--json"
        )
        report = json.loads(out)
        assert status == 1
        assert report["outcome"] != "restored"
        assert report["data_lost"] is True
        assert report["ram_digest_before"]
        assert report["ram_digest_after"] != report["ram_digest_before"]
        assert "host.rebooted" in [entry["event"] for entry in report["timeline"]]


class TestJsonErrors:
    """With --json an error is one JSON object on stderr, stdout stays empty, exit 2."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["demo", "--backend", "sim", "--ram", "0", "--json"],
            ["log", "no-such-store.sqlite", "--json"],
            ["replay", "no-such-store.sqlite", "--js"],
            ["check", "--mode", "nonsense", "--json"],
            ["watch", "no-such.sock", "--store", "s.sqlite", "--vm", "v", "--json"],
            ["check", "--json", "--no-such-option"],
        ],
    )
    def test_one_json_object(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        argv: list[str],
    ) -> None:
        """The object has the message and the error's type, and nothing else is printed."""
        monkeypatch.chdir(tmp_path)
        status, out, err = cli(capsys, *argv)
        assert (status, out) == (2, "")
        assert err.count("\n") == 1
        error = json.loads(err)
        assert set(error) == {"error", "type"}
        assert error["error"]
        assert error["type"].endswith(("Error", "Found"))


# --- random command lines for every subcommand -----------------------------------------------

WORDS = {
    "check": ["--qemu", "10.0", "--mode", "cpr-reboot", "--cap", "x-ignore-shared", "--device",
              "qcow2,node=../x", "vfio", "--memory", "file,id=../y", "--uri", "file:../z",
              "--host", "--param", "--incoming", "migrate", "--model", "../m.yaml", "--json"],
    "log": ["s.sqlite", "--vm", "demo-1", "../s.sqlite", "/dev/null", "fifo", "--json"],
    "replay": ["s.sqlite", "--vm", "demo-1", "--at", "-1", "99999999999999999999", "fifo",
               "--json"],
    "demo": ["--backend", "sim", "auto", "qemu", "--ram", "1M", "64K", "0", "9" * 20, "--memory",
             "ram", "file,share=on", "file,share=on,path=../../p", "file,share=on,id=../q",
             "memfd,share=on", "file,share=on,path=,,", "--uri", "file:../../u", "file:fifo",
             "file:/dev/null", "file:sub/../v", "tcp:h:1", "--device", "qcow2,node=../../d",
             "raw", "vfio", "--cap", "x-ignore-shared", "--suspend", "--reboot", "--strict",
             "--store", "s.sqlite", "a,share=off.sqlite", "--json"],
    "watch": ["no.sock", "fifo", "/dev/null", "--store", "s.sqlite", "--vm", "../v", "--qemu",
              "10.0", "--json"],
}  # fmt: skip


def commands(name: str) -> st.SearchStrategy[list[str]]:
    """Command lines for ``name``: its own words mostly, sometimes any short text."""
    word = st.one_of(st.sampled_from(WORDS[name]), st.text(max_size=8))
    return st.lists(word, max_size=8).map(lambda rest: [name, *rest])


class TestRandomCommandLines:
    """Any argument vector: a typed error, exit 2, one line (JSON with --json), or a result."""

    @pytest.fixture(autouse=True)
    def _no_qemu(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The fuzz drives the simulator: --backend qemu is a usage error, auto picks sim."""
        monkeypatch.setenv("CPRFSM_QEMU", "no-such-qemu-binary")

    @FUZZ
    @given(st.one_of(*(commands(name) for name in WORDS)))
    def test_never_a_traceback_hang_or_stray_write(
        self, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        """Exit 0, 1 or 2; an error is one line; nothing appears outside the working folder."""
        with tempfile.TemporaryDirectory() as root:
            outside = Path(root)
            cwd = outside / "w" / "a" / "b"
            cwd.mkdir(parents=True)
            os.mkfifo(cwd / "fifo")
            before = tree(outside)
            old = Path.cwd()
            os.chdir(cwd)
            try:
                with within(20):
                    status = main(argv)
            finally:
                os.chdir(old)
            _, err = capsys.readouterr()
            assert status in {0, 1, 2}
            assert "Traceback" not in err
            if status == 2 and not any(w == "-h" or w.startswith("--h") for w in argv):
                assert err.count("\n") == 1, err
                if "--json" in argv:
                    assert set(json.loads(err)) == {"error", "type"}
                else:
                    assert err.startswith("cprfsm: error: ")
            stray = {p for p in tree(outside) - before if cwd not in p.parents}
            assert not stray
