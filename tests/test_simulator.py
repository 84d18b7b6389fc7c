"""The simulator: real memory, real files, and the cpr-reboot cycle through the machine."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import attrs
import pytest
from test_statefile import flip, leftovers, mount_tmpfs, payload_offset, small_filesystem

from cprfsm import vm_events as ev
from cprfsm.exceptions import BlockDeviceChanged, CommandFailed, PortError, UsageError
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import rebuild
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts, StreamHeader
from cprfsm.simulator import Simulator, on_volatile_filesystem
from cprfsm.statefile import StateFileReader, StateFileWriter
from cprfsm.store import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from cprfsm.events import Event

RAM = 32 * 2**20
MARKER = b"guest-was-here"
HEADER = StreamHeader(
    qemu_version="10.0",
    mode="cpr-reboot",
    validated=frozenset(),
    runstate="running",
    was_suspended=False,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """An SQLite event store in the test's folder."""
    with SQLiteStore(tmp_path / "log.sqlite") as opened:
        yield opened


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    """A simulator whose files all survive a reboot."""
    with Simulator(tmp_path / "work", volatile=lambda _: False) as simulator:
        yield simulator


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder that holds 4 MiB."""
    with small_filesystem(tmp_path / "small", monkeypatch) as folder:
        yield folder


def machine(
    sim: Simulator, store: SQLiteStore, memory: str, devices: tuple[str, ...] = ()
) -> VirtualMachine:
    """A VM on the simulator."""
    definition = VmDefinition(memory=memory, ram_size=RAM, devices=devices)
    return VirtualMachine(
        "vm", store=store, executor=sim.executor(), definition=definition, qemu="10.0"
    )


def configure(vm: VirtualMachine, *, ignore_shared: bool) -> None:
    """Mode cpr-reboot, and x-ignore-shared if asked (the same on both sides)."""
    vm.set_parameters(mode="cpr-reboot")
    if ignore_shared:
        vm.set_capabilities({"x-ignore-shared": True})


def restart(vm: VirtualMachine, uri: str, *, ignore_shared: bool) -> tuple[Event, ...]:
    """Quit, start with -incoming defer, configure and restore from ``uri``."""
    vm.quit()
    vm.start(incoming=True)
    configure(vm, ignore_shared=ignore_shared)
    return vm.migrate_incoming(uri)


def failure(events: tuple[Event, ...]) -> str:
    """The error of the migration status that failed."""
    return next(
        e.error
        for e in events
        if isinstance(e, ev.MigrationStatusReported) and e.status == "failed"
    )


class TestCprRebootCycle:
    """Save, quit, (reboot), restart and restore, performed for real."""

    def test_x_ignore_shared_leaves_ram_in_the_file(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """A suspended guest with VFIO and a disk: a tiny state file, the same RAM after reboot."""
        vm = machine(sim, store, "file,share=on", devices=("vfio", "qcow2"))
        vm.start()
        sim.guest_write(MARKER, seed=1)
        sim.guest_disk_write("qcow21")
        vm.guest_suspend()
        ram, devices = sim.ram_digest(), sim.device_digest()
        state = tmp_path / "vm.state"
        configure(vm, ignore_shared=True)
        saved = vm.migrate(f"file:{state}")
        assert next(e for e in saved if isinstance(e, ev.RamSaved)).skipped == ("ram0",)
        assert state.stat().st_size < 2**20
        vm.quit()
        vm.reboot_host()
        vm.start(incoming=True)
        configure(vm, ignore_shared=True)
        vm.migrate_incoming(f"file:{state}")
        assert vm.state.runstate == "suspended"
        assert (sim.ram_digest(), sim.device_digest()) == (ram, devices)
        assert sim.guest_read(0, len(MARKER)) == MARKER
        vm.system_wakeup()
        assert vm.state.runstate == "running"

    def test_without_x_ignore_shared_ram_is_in_the_state_file(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """All RAM is written, the save records the guest's digest, and it comes back."""
        vm = machine(sim, store, "file,share=on")
        vm.start()
        sim.guest_write(MARKER, seed=2)
        digest = sim.ram_digest()
        state = tmp_path / "vm.state"
        configure(vm, ignore_shared=False)
        saved = vm.migrate(f"file:{state}")
        ram = next(e for e in saved if isinstance(e, ev.RamSaved))
        assert (ram.written, ram.bytes_written, ram.digest) == (("ram0",), RAM, digest)
        assert state.stat().st_size > RAM
        loaded = restart(vm, f"file:{state}", ignore_shared=False)
        assert next(e for e in loaded if isinstance(e, ev.RamLoaded)).digest == digest
        assert sim.ram_digest() == digest

    def test_volatile_ram_file_is_lost_across_a_reboot(
        self, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """With the RAM file on a wiped filesystem, the restored RAM is not the saved RAM."""
        work = tmp_path / "work"
        with Simulator(work, volatile=lambda path: path.startswith(str(work))) as sim:
            vm = machine(sim, store, "file,share=on")
            vm.start()
            sim.guest_write(MARKER, seed=3)
            digest = sim.ram_digest()
            configure(vm, ignore_shared=True)
            vm.migrate(f"file:{tmp_path / 'vm.state'}")
            vm.quit()
            rebooted = vm.reboot_host()
            vm.start(incoming=True)
            configure(vm, ignore_shared=True)
            vm.migrate_incoming(f"file:{tmp_path / 'vm.state'}")
            assert next(e for e in rebooted if isinstance(e, ev.HostRebooted)).lost == (
                str(work / "ram0"),
            )
            assert sim.ram_digest() != digest
            assert sim.guest_read(0, len(MARKER)) == bytes(len(MARKER))

    def test_memfd_is_saved_under_x_ignore_shared(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """memfd RAM is not a named file: x-ignore-shared still writes it, and it comes back."""
        vm = machine(sim, store, "memfd,share=on")
        vm.start()
        sim.guest_write(MARKER, seed=4)
        digest = sim.ram_digest()
        state = tmp_path / "vm.state"
        configure(vm, ignore_shared=True)
        saved = vm.migrate(f"file:{state}")
        assert next(e for e in saved if isinstance(e, ev.RamSaved)).written == ("ram0",)
        assert state.stat().st_size > RAM
        restart(vm, f"file:{state}", ignore_shared=True)
        assert sim.ram_digest() == digest


class TestDisks:
    """Guest disks must not change between quit and restart; the simulator checks."""

    def test_disk_modified_after_the_save_fails_the_restore(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """An out-of-band write to the image fails the load naming the device; QEMU exits."""
        vm = machine(sim, store, "ram", devices=("vdi",))
        vm.start()
        configure(vm, ignore_shared=False)
        vm.migrate(f"file:{tmp_path / 'vm.state'}")
        vm.quit()
        sim.modify_disk("vdi0")
        vm.start(incoming=True)
        configure(vm, ignore_shared=False)
        error = failure(vm.migrate_incoming(f"file:{tmp_path / 'vm.state'}"))
        assert error.startswith("block device 'vdi0' changed between save and restore: ")
        assert "was written to (generation 1, saved at 0)" in error
        assert not vm.state.qemu_running

    def test_replaced_image_fails_the_load(self, sim: Simulator, tmp_path: Path) -> None:
        """A new image at the same path is not the disk that was saved."""
        ports = sim.ports()
        definition = VmDefinition(devices=("raw",))
        ports.host.start_qemu(definition)
        writer = ports.channel.open_write(f"file:{tmp_path / 'vm.state'}", HEADER)
        ports.devices.save(writer)
        writer.commit()
        sim.disk_image("raw0").unlink()
        ports.host.start_qemu(definition)
        reader = ports.channel.open_read(f"file:{tmp_path / 'vm.state'}")
        with pytest.raises(BlockDeviceChanged, match="is not the image that was saved") as caught:
            ports.devices.load(reader)
        assert caught.value.device == "raw0"

    def test_guest_writes_before_the_save_are_kept(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """The guest's own disk writes before the save change nothing for the restore."""
        vm = machine(sim, store, "ram", devices=("qcow2",))
        vm.start()
        sim.guest_disk_write("qcow20")
        devices = sim.device_digest()
        configure(vm, ignore_shared=False)
        vm.migrate(f"file:{tmp_path / 'vm.state'}")
        restart(vm, f"file:{tmp_path / 'vm.state'}", ignore_shared=False)
        assert vm.state.runstate == "running"
        assert sim.device_digest() == devices

    def test_only_block_devices_have_images(self, sim: Simulator) -> None:
        """Asking for a disk a device list does not have names the ones it has."""
        sim.ports().host.start_qemu(VmDefinition(devices=("vfio", "qcow2,node=disk")))
        assert sim.disk_image("disk").exists()
        with pytest.raises(UsageError, match=r"no block device 'vfio0' \(block devices: disk\)"):
            sim.modify_disk("vfio0")


class TestFailures:
    """A failed save or restore reports QEMU's text and leaves the guest and old files alone."""

    def test_corrupt_ram_section_fails_the_restore_naming_it(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """One flipped byte in RAM section 3: the incoming migration fails naming it."""
        state = tmp_path / "vm.state"
        vm = machine(sim, store, "ram")
        vm.start()
        sim.guest_write(MARKER, seed=5)
        configure(vm, ignore_shared=False)
        vm.migrate(f"file:{state}")
        flip(state, payload_offset(state.read_bytes(), "ram/pc.ram/0003") + 99)
        error = failure(restart(vm, f"file:{state}", ignore_shared=False))
        assert error == f"section 'ram/pc.ram/0003' of {state} is corrupt: checksum mismatch"
        assert vm.state.last_exit == "incoming-failed"

    def test_disk_full_keeps_the_guest_and_the_old_file(
        self, sim: Simulator, store: SQLiteStore, small_fs: Path
    ) -> None:
        """ENOSPC fails the save; the guest runs on with its RAM, the older state file is whole."""
        state = small_fs / "vm.state"
        vm = machine(sim, store, "file,share=on")
        vm.start()
        sim.guest_write(MARKER, seed=6)
        digest = sim.ram_digest()
        configure(vm, ignore_shared=True)
        vm.migrate(f"file:{state}")
        old = state.read_bytes()
        vm.cont()
        vm.set_capabilities({"x-ignore-shared": False})
        events = vm.migrate(f"file:{state}")
        assert failure(events) == "Unable to write to file: No space left on device"
        assert vm.state.runstate == "running"
        assert sim.ram_digest() == digest
        assert state.read_bytes() == old
        assert leftovers(small_fs) == []

    def test_unwritable_uri_fails_migrate_itself(
        self, sim: Simulator, store: SQLiteStore, tmp_path: Path
    ) -> None:
        """A path that cannot be created: QEMU's text, no STOP, the guest untouched."""
        (tmp_path / "a-file").write_bytes(b"")
        vm = machine(sim, store, "ram")
        vm.start()
        sim.guest_write(MARKER, seed=7)
        digest = sim.ram_digest()
        configure(vm, ignore_shared=False)
        with pytest.raises(CommandFailed) as caught:
            vm.migrate(f"file:{tmp_path / 'a-file' / 'vm.state'}")
        assert caught.value.error == (
            f"Could not create '{tmp_path / 'a-file' / 'vm.state'}': Not a directory"
        )
        assert vm.state.runstate == "running"
        assert sim.ram_digest() == digest

    def test_missing_state_file(self, sim: Simulator, store: SQLiteStore, tmp_path: Path) -> None:
        """Restoring from a file that is not there: QEMU's ``Could not open``."""
        vm = machine(sim, store, "ram")
        vm.start(incoming=True)
        with pytest.raises(CommandFailed) as caught:
            vm.migrate_incoming(f"file:{tmp_path / 'nothing'}")
        assert (
            caught.value.error
            == f"Could not open '{tmp_path / 'nothing'}': No such file or directory"
        )

    @pytest.mark.parametrize("uri", ["tcp:localhost:4444", "unix:/run/vm.sock", "nonsense"])
    def test_only_file_uris(self, sim: Simulator, uri: str) -> None:
        """Every other transport is unknown to the simulated QEMU."""
        with pytest.raises(PortError, match=f"^unknown migration protocol: {uri}$"):
            sim.ports().channel.open_write(uri, HEADER)

    def test_ram_size_must_match(self, sim: Simulator, tmp_path: Path) -> None:
        """A destination with another RAM size refuses the stream with QEMU's text."""
        ports = sim.ports()
        ports.host.start_qemu(VmDefinition(ram_size=16 * 2**20))
        writer = ports.channel.open_write(f"file:{tmp_path / 'vm.state'}", HEADER)
        ports.memory.save(writer, frozenset())
        writer.commit()
        ports.host.start_qemu(VmDefinition(ram_size=RAM))
        reader = ports.channel.open_read(f"file:{tmp_path / 'vm.state'}")
        with pytest.raises(
            PortError, match=r"^Length mismatch: pc.ram: 0x1000000 in != 0x2000000"
        ):
            ports.memory.load(reader, frozenset())

    @pytest.mark.parametrize(
        ("saved", "restored", "section"),
        [(("vfio",), (), "devices/vfio0"), (("vfio,node=d",), ("raw,node=d",), "devices/d")],
        ids=["missing", "other-model"],
    )
    def test_device_the_destination_lacks(
        self,
        sim: Simulator,
        tmp_path: Path,
        saved: tuple[str, ...],
        restored: tuple[str, ...],
        section: str,
    ) -> None:
        """A saved device the destination does not have: QEMU's unknown-section text."""
        ports = sim.ports()
        ports.host.start_qemu(VmDefinition(devices=saved))
        writer = ports.channel.open_write(f"file:{tmp_path / 'vm.state'}", HEADER)
        ports.devices.save(writer)
        writer.commit()
        ports.host.start_qemu(VmDefinition(devices=restored))
        reader = ports.channel.open_read(f"file:{tmp_path / 'vm.state'}")
        with pytest.raises(PortError, match=f"^Unknown savevm section or instance '{section}' 0"):
            ports.devices.load(reader)


class TestMemoryAndHost:
    """Backends map as QEMU maps them; a reboot wipes what is volatile."""

    @pytest.mark.parametrize(
        ("memory", "survives"),
        [
            ("ram", False),
            ("ram,share=on", False),
            ("memfd,share=on", False),
            ("file,share=on", True),
        ],
    )
    def test_a_new_process_maps_ram_afresh(
        self, sim: Simulator, memory: str, survives: bool
    ) -> None:
        """Anonymous and memfd RAM start zeroed; a shared file keeps the last process's RAM."""
        host = sim.ports().host
        host.start_qemu(VmDefinition(memory=memory, ram_size=RAM))
        sim.guest_write(MARKER, seed=8)
        host.stop_qemu()
        host.start_qemu(VmDefinition(memory=memory, ram_size=RAM))
        assert (sim.guest_read(0, len(MARKER)) == MARKER) is survives

    @pytest.mark.parametrize(
        "memory", ["ram", "ram,share=on", "memfd,share=on,id=mem", "file,share=on,id=pmem"]
    )
    def test_block_names_match_the_recording_ports(self, sim: Simulator, memory: str) -> None:
        """RAM blocks are named, shared and backed as RecordingPorts says."""
        recording = RecordingPorts()
        recording.start_qemu(VmDefinition(memory=memory))
        sim.ports().host.start_qemu(VmDefinition(memory=memory))
        (ours,), (theirs,) = sim.ports().memory.blocks(), recording.blocks()
        assert (ours.name, ours.shared, ours.named_file) == (
            theirs.name,
            theirs.shared,
            theirs.named_file,
        )

    def test_any_stream_carries_the_ram(self, sim: Simulator) -> None:
        """Saving to and loading from another StreamWriter/StreamReader gives the same digest."""
        ports = sim.ports()
        ports.host.start_qemu(VmDefinition(memory="memfd,share=on", ram_size=RAM))
        sim.guest_write(MARKER, seed=9)
        digest = sim.ram_digest()
        stream = RecordingPorts().open_write("file:/nowhere", HEADER)
        assert ports.memory.save(stream, frozenset()).digest == digest
        ports.host.start_qemu(VmDefinition(memory="memfd,share=on", ram_size=RAM))
        assert ports.memory.load(stream, frozenset()).digest == digest  # type: ignore[arg-type]
        assert sim.ram_digest() == digest

    def test_device_state_moves_as_the_guest_runs(self, sim: Simulator) -> None:
        """The guest running changes the device digest; a new process starts from scratch."""
        host = sim.ports().host
        host.start_qemu(VmDefinition(memory="ram", devices=("vfio",)))
        fresh = sim.device_digest()
        sim.guest_write(MARKER, seed=10)
        assert sim.device_digest() != fresh
        host.start_qemu(VmDefinition(memory="ram", devices=("vfio",)))
        assert sim.device_digest() == fresh

    def test_reboot_wipes_known_files_on_volatile_filesystems(self, tmp_path: Path) -> None:
        """State files and RAM files on a volatile path are deleted and listed; others stay."""
        wiped, kept = tmp_path / "shm", tmp_path / "disk"
        wiped.mkdir()
        kept.mkdir()
        with Simulator(tmp_path / "work", volatile=lambda p: p.startswith(str(wiped))) as sim:
            ports = sim.ports()
            ports.host.start_qemu(
                VmDefinition(memory=f"file,share=on,path={wiped / 'ram'}", ram_size=2**20)
            )
            for folder in (wiped, kept):
                ports.channel.open_write(f"file:{folder / 'vm.state'}", HEADER).commit()
            lost = ports.host.reboot()
        assert lost == (str(wiped / "ram"), f"file:{wiped / 'vm.state'}")
        assert list(wiped.iterdir()) == []
        assert (kept / "vm.state").exists()

    def test_default_volatility_reads_the_mount_table(self, tmp_path: Path) -> None:
        """A path on a tmpfs mount is volatile; /proc is not."""
        folder = tmp_path / "tmpfs"
        folder.mkdir()
        if not mount_tmpfs(folder, 2**20):
            pytest.skip("cannot mount a tmpfs here")
        try:
            assert on_volatile_filesystem(str(folder / "deep" / "vm.state"))
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        assert not on_volatile_filesystem("/proc/self")

    def test_guest_actions_need_a_process(self, sim: Simulator) -> None:
        """Without a QEMU process there is no guest RAM to write or digest."""
        with pytest.raises(PortError, match="QEMU is not running"):
            sim.guest_write(MARKER, seed=0)

    def test_import_cprfsm_leaves_the_simulator_out(self) -> None:
        """The simulator and the state-file format load only when imported by name."""
        code = (
            "import sys, cprfsm; "
            "print([m for m in ('cprfsm.simulator', 'cprfsm.statefile') if m in sys.modules])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert proc.stdout.strip() == "[]"


def test_a_stream_naming_a_runstate_inmigrate_cannot_reach_aborts_qemu(tmp_path: Path) -> None:
    """A crafted stream saying runstate debug: QEMU aborts; the model, not knowing it, diverges."""
    with Simulator(tmp_path / "sim") as sim, SQLiteStore(tmp_path / "log.sqlite") as store:
        vm = machine(sim, store, "ram")
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.migrate(f"file:{tmp_path / 'good.state'}")
        vm.quit()
        with StateFileReader(tmp_path / "good.state") as good:
            crafted = StateFileWriter(
                tmp_path / "debug.state", attrs.evolve(good.header, runstate="debug")
            )
            for section in good.sections:
                crafted.write(section, good.read(section))
            crafted.commit()
        vm.start(incoming=True)
        vm.set_parameters(mode="cpr-reboot")
        events = vm.migrate_incoming(f"file:{tmp_path / 'debug.state'}")
        assert [type(e) for e in events] == [
            ev.OperationStarted,
            ev.ModelDiverged,
            ev.QemuExited,
        ]
        assert "'inmigrate' -> 'debug'" in events[-1].detail  # type: ignore[attr-defined]
        assert vm.state.runstate is None
        assert vm.state.last_exit == "abort"
        assert rebuild(store, "vm") == vm.state
