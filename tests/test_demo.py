"""cprfsm demo: whole cpr-reboot cycles on the simulator, and what the report says."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cprfsm import vm_events as ev
from cprfsm.cli import main
from cprfsm.demo import DemoOptions, parse_size, run_demo
from cprfsm.executor import VmDefinition
from cprfsm.machine import VirtualMachine
from cprfsm.simulator import Simulator
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterator

SMALL = 16 * 2**20


@pytest.fixture
def shm_path() -> Iterator[str]:
    """A RAM file path on /dev/shm (tmpfs: volatile across a reboot), removed afterwards."""
    path = Path("/dev/shm") / f"cprfsm-test-{uuid.uuid4().hex}"
    yield str(path)
    path.unlink(missing_ok=True)


def demo(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """Run the demo in-process and return its JSON report."""
    report = run_demo(DemoOptions(store=tmp_path / "demo.sqlite", ram=SMALL, **options))
    return report.to_json()


class TestDoneWhen:
    """The cases the issue lists."""

    def test_persistent_file_with_x_ignore_shared(self, tmp_path: Path) -> None:
        """RAM stays in the file: the state file is tiny and the RAM comes back intact."""
        path = tmp_path / "pmem" / "guest-ram"
        path.parent.mkdir()
        report = demo(
            tmp_path, memory=f"file,share=on,path={path}", capabilities=("x-ignore-shared",)
        )
        assert report["outcome"] == "restored"
        assert report["data_lost"] is False
        assert report["state_file_bytes"] < 2**20
        assert report["ram_digest_before"] == report["ram_digest_after"]

    def test_persistent_file_without_x_ignore_shared(self, tmp_path: Path) -> None:
        """Without x-ignore-shared the RAM is written to the state file and restored."""
        report = demo(tmp_path, memory="file,share=on")
        assert report["outcome"] == "restored"
        assert report["data_lost"] is False
        assert report["state_file_bytes"] > SMALL

    def test_volatile_file_and_reboot_lose_the_ram(self, tmp_path: Path, shm_path: str) -> None:
        """The hazard is reported before the reboot; after it the RAM is lost."""
        report = demo(
            tmp_path,
            memory=f"file,share=on,path={shm_path}",
            capabilities=("x-ignore-shared",),
            reboot=True,
        )
        assert list(report["hazards"]) == ["ignore-shared-volatile-ram"] * 2
        assert report["data_lost"] is True
        events = [entry["event"] for entry in report["timeline"]]
        assert events.index("hazard.reported") < events.index("host.rebooted")
        assert events.index("host.rebooted") < events.index("guest-data.lost")

    def test_strict_refuses_and_loses_nothing(self, tmp_path: Path, shm_path: str) -> None:
        """--strict refuses the save; the guest keeps running with its RAM."""
        report = demo(
            tmp_path,
            memory=f"file,share=on,path={shm_path}",
            capabilities=("x-ignore-shared",),
            reboot=True,
            strict=True,
        )
        assert report["outcome"] == "refused"
        assert report["error"].startswith("ignore-shared-volatile-ram")
        assert report["data_lost"] is False
        assert report["runstate"] == "running"
        assert report["ram_digest_before"] == report["ram_digest_after"]

    def test_vfio_without_suspend_fails_and_keeps_running(self, tmp_path: Path) -> None:
        """The migration fails as QEMU's does; the guest keeps running."""
        report = demo(tmp_path, devices=("vfio",))
        assert report["outcome"] == "migration-failed"
        assert report["error"] == "VFIO device only supports cpr-reboot for runstate suspended"
        assert report["runstate"] == "running"
        assert report["data_lost"] is False

    def test_vfio_with_suspend_comes_back_suspended_then_runs(self, tmp_path: Path) -> None:
        """With --suspend the restore resumes into suspended, then the wakeup runs it."""
        report = demo(tmp_path, devices=("vfio",), suspend=True)
        assert report["outcome"] == "restored"
        details = [(e["event"], e["detail"], e["phase"]) for e in report["timeline"]]
        assert ("vm.resumed", "suspended", "suspended") in details
        assert details[-1] == ("guest.woke-up", "", "running")
        phases = [e["phase"] for e in report["timeline"]]
        assert {"saved", "incoming", "suspended"} <= set(phases)
        assert report["runstate"] == "running"


def test_flipped_byte_names_the_section(tmp_path: Path) -> None:
    """One flipped byte in a RAM section fails the restore with that section's name."""
    with SQLiteStore(tmp_path / "log.sqlite") as store, Simulator(tmp_path / "sim") as sim:
        vm = VirtualMachine(
            "vm", store=store, executor=sim.executor(), definition=VmDefinition(ram_size=SMALL)
        )
        vm.start()
        sim.guest_write(b"marker", seed=7)
        vm.set_parameters(mode="cpr-reboot")
        uri = f"file:{tmp_path / 'vm.state'}"
        vm.migrate(uri)
        state = tmp_path / "vm.state"
        data = bytearray(state.read_bytes())
        middle = len(data) // 2
        data[middle] ^= 0xFF
        state.write_bytes(bytes(data))
        vm.quit()
        vm.start(incoming=True)
        vm.set_parameters(mode="cpr-reboot")
        events = vm.migrate_incoming(uri)
        failed = next(
            e for e in events if isinstance(e, ev.MigrationStatusReported) and e.status == "failed"
        )
        assert "section 'ram/pc.ram/" in failed.error
        assert "is corrupt" in failed.error
        assert not vm.state.qemu_running


class TestCommandLine:
    """The command line around the demo."""

    def test_json_and_exit_status(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json prints the report's keys; a clean restore exits 0, a refusal 1."""
        store = str(tmp_path / "d.sqlite")
        assert main(["demo", "--store", store, "--ram", "16M", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        for key in (
            "phase",
            "runstate",
            "state_file_bytes",
            "save_seconds",
            "restore_seconds",
            "ram_digest_before",
            "ram_digest_after",
            "data_lost",
            "hazards",
        ):
            assert key in report
        assert main(["demo", "--store", store, "--ram", "16M", "--device", "vfio"]) == 1
        out = capsys.readouterr().out
        assert "migration-failed" in out
        assert "timeline:" in out

    def test_replay_reproduces_the_demo(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """cprfsm replay on the demo's store gives the demo's final phase and runstate."""
        store = str(tmp_path / "d.sqlite")
        main(["demo", "--store", store, "--ram", "16M", "--suspend", "--json"])
        report = json.loads(capsys.readouterr().out)
        assert main(["replay", store, "--vm", report["vm"], "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert (state["phase"], state["runstate"]) == (report["phase"], report["runstate"])

    @pytest.mark.parametrize("size", ["", "0", "12Q", "-3M"])
    def test_bad_size(self, size: str) -> None:
        """A RAM size that is not a size is a usage error."""
        with pytest.raises(ValueError, match="not a size"):
            parse_size(size)

    def test_sizes(self) -> None:
        """Sizes take K, M, G suffixes with or without iB."""
        assert parse_size("64M") == 64 * 2**20
        assert parse_size("1G") == 2**30
        assert parse_size("512MiB") == 512 * 2**20
