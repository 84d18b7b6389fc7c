"""The lifecycle machine: QEMU's order of operations, refusals, compensation and replay."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from cprfsm import IllegalTransition, StoreError
from cprfsm import vm_events as ev
from cprfsm.exceptions import CommandFailed, QemuAbortPredicted
from cprfsm.executor import VmDefinition
from cprfsm.lifecycle import PHASES, phase_diagram, rebuild, replay
from cprfsm.machine import VirtualMachine
from cprfsm.ports import RecordingPorts
from cprfsm.store import InMemoryStore, SQLiteStore
from cprfsm.testing import capture_transitions

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from cprfsm.events import Event
    from cprfsm.store import EventStore

PMEM = "file,share=on,path=/mnt/pmem/guest-ram"
STATE_URI = "file:/var/lib/cprfsm/vm.state"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    """Each test runs on the in-memory store and on SQLite."""
    with (
        InMemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "log.sqlite") as s
    ):
        yield s


def machine(
    store: EventStore, *, memory: str = "ram", devices: tuple[str, ...] = (), qemu: str = "10.0"
) -> tuple[VirtualMachine, RecordingPorts]:
    """A VM with recording ports."""
    ports = RecordingPorts()
    definition = VmDefinition(memory=memory, devices=devices)
    return VirtualMachine(
        "vm", store=store, executor=ports.executor(), definition=definition, qemu=qemu
    ), ports


def tags(events: tuple[Event, ...]) -> list[str]:
    """Events as readable tags, with the status or runstate they carry."""
    out = []
    for event in events:
        detail = None
        if isinstance(event, ev.MigrationStatusReported):
            detail = event.status
        elif isinstance(event, (ev.VmStopped, ev.VmResumed, ev.RunstateSet, ev.GuestReset)):
            detail = event.runstate
        out.append(f"{type(event).type_tag}:{detail}" if detail else type(event).type_tag)
    return out


def replayed(store: EventStore) -> object:
    """The state rebuilt from the store alone."""
    return replay("vm", (r.event for r in store.read("vm")), qemu="10.0")


class TestCprRebootCycle:
    """The full cycle of the issue: suspend, save, quit, reboot, restore, wake."""

    def test_suspended_guest_with_vfio_survives_a_host_reboot(self, store: EventStore) -> None:
        """Every phase is QEMU's, the RAM comes back, and replay reproduces the live state."""
        vm, ports = machine(store, memory=PMEM, devices=("vfio",))
        phases = [vm.start() and vm.state.phase]
        ports.write_guest(b"guest-data")
        vm.guest_suspend()
        phases.append(vm.state.phase)
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        saved = vm.migrate(STATE_URI)
        assert tags(saved) == [
            "operation.started",
            "migration.started",
            "vm.stopped:finish-migrate",
            "migration.status:active",
            "ram.saved",
            "migration.status:device",
            "device-state.saved",
            "state-file.written",
            "migration.status:completed",
            "vm.runstate-set:postmigrate",
        ]
        ram = next(e for e in saved if isinstance(e, ev.RamSaved))
        assert ram.skipped == ("ram0",)
        assert ram.bytes_written == 0
        phases.append(vm.state.phase)
        vm.quit()
        phases.append(vm.state.phase)
        vm.reboot_host()
        phases.append(vm.state.phase)
        vm.start(incoming=True)
        phases.append(vm.state.phase)
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        loaded = vm.migrate_incoming(STATE_URI)
        assert tags(loaded)[-2:] == ["vm.resumed:suspended", "migration.status:completed"]
        phases.append(vm.state.phase)
        vm.system_wakeup()
        phases.append(vm.state.phase)
        assert phases == [
            "running",
            "suspended",
            "saved",
            "saved",
            "saved",
            "incoming",
            "suspended",
            "running",
        ]
        assert ports.ram == {"ram0": b"guest-data"}
        assert vm.runstate == "running"
        assert replayed(store) == vm.state

    def test_running_guest_with_vfio_fails_asynchronously(self, store: EventStore) -> None:
        """migrate is accepted, the migration fails with QEMU's text, the VM keeps running."""
        vm, ports = machine(store, devices=("vfio",))
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        calls = len(ports.calls)
        events = vm.migrate(STATE_URI)
        assert tags(events) == [
            "operation.started",
            "migration.started",
            "migration.status:failed",
        ]
        assert events[-1].error == "VFIO device only supports cpr-reboot for runstate suspended"  # type: ignore[attr-defined]
        assert vm.state.runstate == "running"
        assert vm.state.outgoing_status == "failed"
        assert len(ports.calls) == calls
        assert replayed(store) == vm.state

    def test_ram_is_written_without_x_ignore_shared(self, store: EventStore) -> None:
        """Without x-ignore-shared the shared file's RAM goes into the stream."""
        vm, ports = machine(store, memory=PMEM)
        vm.start()
        ports.write_guest(b"abc")
        vm.set_parameters(mode="cpr-reboot")
        saved = vm.migrate(STATE_URI)
        ram = next(e for e in saved if isinstance(e, ev.RamSaved))
        assert (ram.written, ram.skipped, ram.bytes_written) == (("ram0",), (), 3)


class TestRefusals:
    """A refused command changes nothing, records nothing and calls no port."""

    @pytest.mark.parametrize("cap", ["postcopy-ram", "x-colo", "background-snapshot"])
    def test_cpr_conflict(self, store: EventStore, cap: str) -> None:
        """cpr-reboot with a conflicting capability is refused at migrate."""
        vm, ports = machine(store)
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({cap: True})
        before, calls = vm.state, list(ports.calls)
        with pytest.raises(IllegalTransition) as caught:
            vm.migrate(STATE_URI)
        assert caught.value.verdict.failed_at == "migrate"
        assert vm.state == before
        assert store.version("vm") == before.version
        assert ports.calls == calls

    def test_capability_conflict_at_set_capabilities(self, store: EventStore) -> None:
        """migrate-set-capabilities refuses an incompatible set as a whole."""
        vm, _ = machine(store)
        vm.start()
        vm.set_capabilities({"postcopy-ram": True})
        with pytest.raises(
            IllegalTransition, match="Postcopy is not compatible with ignore-shared"
        ):
            vm.set_capabilities({"x-ignore-shared": True})
        assert vm.state.capabilities == {"postcopy-ram"}

    def test_commands_need_a_qemu(self, store: EventStore) -> None:
        """Without a QEMU process the QMP commands are refused."""
        vm, _ = machine(store)
        with pytest.raises(IllegalTransition, match="QEMU is not running"):
            vm.cont()
        assert store.version("vm") == 0

    def test_wakeup_needs_suspended(self, store: EventStore) -> None:
        """A paused guest that was suspended cannot be woken until cont."""
        vm, _ = machine(store)
        vm.start()
        vm.guest_suspend()
        vm.stop()
        assert (vm.state.runstate, vm.state.was_suspended) == ("paused", True)
        with pytest.raises(IllegalTransition, match="Unable to wake up"):
            vm.system_wakeup()
        vm.cont()
        assert vm.state.runstate == "suspended"
        vm.system_wakeup()
        assert vm.state.runstate == "running"

    def test_migrate_after_migrate(self, store: EventStore) -> None:
        """A second migrate from postmigrate is refused; cont then allows it."""
        vm, _ = machine(store)
        vm.start()
        vm.migrate(STATE_URI)
        with pytest.raises(IllegalTransition, match="paused due to previous migration"):
            vm.migrate(STATE_URI)
        vm.cont()
        assert vm.state.runstate == "running"


class TestNoOps:
    """A command that changes nothing records nothing."""

    def test_no_events_for_no_ops(self, store: EventStore) -> None:
        """cont while running, stop while paused, and repeating settings append nothing."""
        vm, _ = machine(store)
        vm.start()
        vm.set_capabilities({"events": True})
        version = vm.state.version
        assert vm.cont() == ()
        assert vm.set_capabilities({"events": True}) == ()
        assert vm.set_parameters(mode="normal") == ()
        assert vm.migrate_cancel() == ()
        vm.stop()
        assert vm.stop() == ()
        assert store.version("vm") == version + 1


class TestFailures:
    """A failed operation records QEMU's compensating outcome."""

    def test_ram_save_fails_after_the_stop(self, store: EventStore) -> None:
        """The VM resumes (RESUME) after a failure past the CPR stop."""
        vm, ports = machine(store)
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        ports.fail("memory.save", "Unable to write to file: No space left on device")
        events = vm.migrate(STATE_URI)
        assert tags(events)[-3:] == [
            "operation.failed",
            "migration.status:failed",
            "vm.resumed:running",
        ]
        assert vm.state.runstate == "running"
        assert replayed(store) == vm.state

    def test_suspended_guest_returns_suspended(self, store: EventStore) -> None:
        """A suspended guest goes back to suspended, not running."""
        vm, ports = machine(store)
        vm.start()
        vm.guest_suspend()
        vm.set_parameters(mode="cpr-reboot")
        ports.fail("devices.save", "device save failed")
        vm.migrate(STATE_URI)
        assert vm.state.runstate == "suspended"

    def test_unwritable_uri_is_a_synchronous_error(self, store: EventStore) -> None:
        """A file that cannot be created fails migrate itself; no STOP happens."""
        vm, ports = machine(store)
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        ports.fail("channel.open_write", "Could not create '/ro/vm.state': Permission denied")
        with pytest.raises(CommandFailed) as caught:
            vm.migrate("file:/ro/vm.state")
        assert caught.value.error.startswith("Could not create")
        assert "vm.stopped" not in tags(caught.value.events)
        assert vm.state.outgoing_status == "failed"
        assert vm.state.runstate == "running"

    def test_paused_source_has_no_stop_event(self, store: EventStore) -> None:
        """A paused source changes runstate silently and arrives paused, without RESUME."""
        vm, _ = machine(store)
        vm.start()
        vm.stop()
        vm.set_parameters(mode="cpr-reboot")
        saved = vm.migrate(STATE_URI)
        assert "vm.stopped:finish-migrate" not in tags(saved)
        assert "vm.runstate-set:finish-migrate" in tags(saved)
        vm.quit()
        vm.start(incoming=True)
        loaded = vm.migrate_incoming(STATE_URI)
        assert tags(loaded)[-2:] == ["vm.runstate-set:paused", "migration.status:completed"]

    def test_cont_and_stop_while_incoming_only_set_autostart(self, store: EventStore) -> None:
        """stop and cont on a waiting destination change autostart, not the runstate."""
        vm, _ = machine(store)
        vm.start()
        vm.migrate(STATE_URI)
        vm.quit()
        vm.start(incoming=True)
        assert tags(vm.stop()) == ["vm.autostart-changed"]
        assert tags(vm.cont()) == ["vm.autostart-changed"]
        assert vm.cont() == ()
        assert vm.state.runstate == "inmigrate"
        vm.migrate_incoming(STATE_URI)
        assert vm.state.runstate == "running"

    def test_after_a_restore(self, store: EventStore) -> None:
        """A restored QEMU refuses another migrate-incoming but accepts multifd again."""
        vm, _ = machine(store)
        vm.start()
        vm.migrate(STATE_URI)
        vm.quit()
        vm.start(incoming=True)
        vm.migrate_incoming(STATE_URI)
        with pytest.raises(IllegalTransition, match="already been started"):
            vm.migrate_incoming(STATE_URI)
        assert tags(vm.set_capabilities({"multifd": True})) == ["migration.capabilities-set"]

    def test_destination_with_minus_s_ends_paused(self, store: EventStore) -> None:
        """With -S the destination ends paused; cont then runs it."""
        vm, _ = machine(store)
        vm.start()
        vm.migrate(STATE_URI)
        vm.quit()
        vm.start(incoming=True, paused=True)
        vm.migrate_incoming(STATE_URI)
        assert vm.state.runstate == "paused"
        vm.cont()
        assert vm.state.runstate == "running"

    def test_capability_mismatch_kills_the_destination(self, store: EventStore) -> None:
        """x-ignore-shared must match on both sides; a mismatch fails the load and QEMU exits."""
        vm, _ = machine(store, memory=PMEM)
        vm.start()
        vm.set_capabilities({"x-ignore-shared": True})
        vm.migrate(STATE_URI)
        vm.quit()
        vm.start(incoming=True)
        events = vm.migrate_incoming(STATE_URI)
        failed = next(
            e for e in events if isinstance(e, ev.MigrationStatusReported) and e.status == "failed"
        )
        assert failed.error == "Capability x-ignore-shared is off, but received capability is on"
        assert not vm.state.qemu_running
        assert vm.state.last_exit == "incoming-failed"

    def test_volatile_state_file_is_gone_after_reboot(self, store: EventStore) -> None:
        """A state file under /dev/shm does not survive a reboot: QEMU cannot open it."""
        vm, _ = machine(store)
        vm.start()
        vm.migrate("file:/dev/shm/vm.state")
        vm.quit()
        rebooted = vm.reboot_host()
        assert rebooted[-1] == ev.HostRebooted(host_boot=2, lost=("file:/dev/shm/vm.state",))
        assert vm.state.phase == "stopped"
        vm.start(incoming=True)
        with pytest.raises(CommandFailed, match=r"Could not open '/dev/shm/vm\.state'"):
            vm.migrate_incoming("file:/dev/shm/vm.state")
        assert vm.state.incoming_status == "setup"
        with pytest.raises(IllegalTransition, match="Illegal migration incoming state: setup"):
            vm.migrate_incoming("file:/dev/shm/vm.state")
        vm.set_capabilities({"multifd": True})  # the wedged incoming never started

    def test_failure_from_debug_predicts_an_abort(self, store: EventStore) -> None:
        """Going back from finish-migrate to debug is outside QEMU's table: QEMU aborts."""
        vm, ports = machine(store)
        vm.start()
        vm.debug_stop()
        vm.set_parameters(mode="cpr-reboot")
        ports.fail("memory.save", "write error")
        with pytest.raises(QemuAbortPredicted) as caught:
            vm.migrate(STATE_URI)
        assert caught.value.error == "invalid runstate transition: 'finish-migrate' -> 'debug'"
        assert not vm.state.qemu_running
        assert vm.state.last_exit == "abort"
        assert replayed(store) == vm.state


class TestAbortPredictions:
    """Where QEMU would abort, the machine says so instead of inventing an outcome."""

    def test_cont_after_saving_a_suspended_guest(self, store: EventStore) -> None:
        """cont from postmigrate with the suspended flag aborts QEMU 10.0.2 (checked live)."""
        vm, ports = machine(store)
        vm.start()
        vm.guest_suspend()
        vm.set_parameters(mode="cpr-reboot")
        vm.migrate(STATE_URI)
        before, calls = vm.state, list(ports.calls)
        with pytest.raises(QemuAbortPredicted) as caught:
            vm.cont()
        assert caught.value.error == "invalid runstate transition: 'postmigrate' -> 'suspended'"
        assert caught.value.events == ()
        assert (vm.state, ports.calls) == (before, calls)

    def test_debug_stop_of_a_suspended_guest(self, store: EventStore) -> None:
        """The table has no suspended -> debug: stopping a suspended guest for gdb aborts."""
        vm, _ = machine(store)
        vm.start()
        vm.guest_suspend()
        with pytest.raises(QemuAbortPredicted, match="'suspended' -> 'debug'"):
            vm.debug_stop()
        assert vm.state.runstate == "suspended"


class TestDataAtRisk:
    """A step that can lose saved guest data is announced in the log before it happens."""

    def test_fresh_boot_over_ram_kept_in_place(self, store: EventStore) -> None:
        """A fresh boot on a RAM file a save relies on is announced; the restore shows it."""
        vm, ports = machine(store, memory=PMEM)
        vm.start()
        ports.write_guest(b"saved")
        vm.set_capabilities({"x-ignore-shared": True})
        vm.migrate(STATE_URI)
        vm.quit()
        events = vm.start()
        assert isinstance(events[0], ev.HazardReported)
        assert events[0].rule == "saved-ram-reused"
        assert "/mnt/pmem/guest-ram" in events[0].detail
        hazard_version = vm.state.version - 1
        ports.write_guest(b"new boot")
        vm.quit()
        vm.start(incoming=True)
        vm.set_capabilities({"x-ignore-shared": True})
        restored = vm.migrate_incoming(STATE_URI)
        assert ports.ram == {"ram0": b"new boot"}
        lost = next(e for e in restored if isinstance(e, ev.GuestDataLost))
        assert lost.hazards == (hazard_version,)

    def test_no_warning_when_the_stream_holds_the_ram(self, store: EventStore) -> None:
        """Without x-ignore-shared the stream has the RAM, so a fresh boot risks nothing."""
        vm, _ = machine(store, memory=PMEM)
        vm.start()
        vm.migrate(STATE_URI)
        vm.quit()
        assert not any(isinstance(e, ev.HazardReported) for e in vm.start())

    def test_volatile_ram_file_and_reboot(self, store: EventStore) -> None:
        """x-ignore-shared on a tmpfs RAM file: reported at migrate and reboot, lost at restore."""
        vm, ports = machine(store, memory="file,share=on,path=/dev/shm/guest-ram")
        vm.start()
        ports.write_guest(b"precious")
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        saved = vm.migrate(STATE_URI)
        assert [e.rule for e in saved if isinstance(e, ev.HazardReported)] == [
            "ignore-shared-volatile-ram"
        ]
        vm.quit()
        rebooted = vm.reboot_host()
        assert [e.rule for e in rebooted if isinstance(e, ev.HazardReported)] == [
            "ignore-shared-volatile-ram"
        ]
        vm.start(incoming=True)
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        restored = vm.migrate_incoming(STATE_URI)
        lost = next(e for e in restored if isinstance(e, ev.GuestDataLost))
        assert len(lost.hazards) == 2
        assert [version for version, _ in vm.state.hazards] == list(lost.hazards)
        vm.set_capabilities({"x-ignore-shared": False})
        vm.migrate(STATE_URI)  # a new save starts a new account of hazards
        assert vm.state.hazards == ()

    def test_strict_mode_refuses_and_loses_nothing(self, store: EventStore) -> None:
        """In strict mode the reboot that would lose the RAM is refused; the RAM survives."""
        ports = RecordingPorts()
        definition = VmDefinition(memory="file,share=on,path=/dev/shm/guest-ram")
        vm = VirtualMachine(
            "vm",
            store=store,
            executor=ports.executor(),
            definition=definition,
            qemu="10.0",
            strict=True,
        )
        vm.start()
        ports.write_guest(b"precious")
        vm.set_capabilities({"x-ignore-shared": True})
        with pytest.raises(IllegalTransition, match="a host reboot wipes"):
            vm.migrate(STATE_URI)
        vm.set_capabilities({"x-ignore-shared": False})
        vm.migrate(STATE_URI)
        vm.quit()
        vm.reboot_host()
        vm.start(incoming=True)
        vm.migrate_incoming(STATE_URI)
        assert ports.ram == {"ram0": b"precious"}
        assert not any(isinstance(r.event, ev.GuestDataLost) for r in store.read("vm"))

    def test_ignore_shared_on_memfd_costs_but_loses_nothing(self, store: EventStore) -> None:
        """x-ignore-shared on memfd is reported as a cost (the RAM is written anyway)."""
        vm, _ = machine(store, memory="memfd,share=on")
        vm.start()
        vm.set_capabilities({"x-ignore-shared": True})
        hazards = [e for e in vm.migrate(STATE_URI) if isinstance(e, ev.HazardReported)]
        assert [(h.rule, h.loses_data) for h in hazards] == [("ignore-shared-not-skipped", False)]


class TestSwitchover:
    """pause-before-switchover stops in pre-switchover until continue or cancel."""

    def test_continue_completes(self, store: EventStore) -> None:
        """migrate-continue finishes the save."""
        vm, _ = machine(store)
        vm.start()
        vm.set_capabilities({"pause-before-switchover": True})
        vm.migrate(STATE_URI)
        assert (vm.state.outgoing_status, vm.state.runstate) == (
            "pre-switchover",
            "finish-migrate",
        )
        vm.migrate_continue()
        assert (vm.state.outgoing_status, vm.state.runstate) == ("completed", "postmigrate")

    def test_cancel_resumes(self, store: EventStore) -> None:
        """migrate_cancel goes cancelling, resumes the guest, then cancelled (live order)."""
        vm, _ = machine(store)
        vm.start()
        vm.set_capabilities({"pause-before-switchover": True})
        vm.migrate(STATE_URI)
        events = vm.migrate_cancel()
        assert tags(events) == [
            "migration.status:cancelling",
            "vm.resumed:running",
            "migration.status:cancelled",
        ]

    def test_a_reloaded_controller_continues_the_migration_qemu_holds(
        self, store: EventStore
    ) -> None:
        """The stream lives in QEMU (the executor), so a new controller can continue it."""
        vm, ports = machine(store)
        vm.start()
        vm.set_capabilities({"pause-before-switchover": True})
        vm.migrate(STATE_URI)
        reloaded = VirtualMachine("vm", store=store, executor=ports.executor(), qemu="10.0")
        reloaded.migrate_continue()
        assert (reloaded.state.outgoing_status, reloaded.state.runstate) == (
            "completed",
            "postmigrate",
        )
        assert replayed(store) == reloaded.state

    def test_a_controller_whose_qemu_is_gone_records_the_exit(self, store: EventStore) -> None:
        """A new executor has no QEMU: continue finds none; the divergence and exit are kept."""
        vm, _ = machine(store)
        vm.start()
        vm.set_capabilities({"pause-before-switchover": True})
        vm.migrate(STATE_URI)
        reloaded = VirtualMachine(
            "vm", store=store, executor=RecordingPorts().executor(), qemu="10.0"
        )
        events = reloaded.migrate_continue()
        assert tags(events) == ["operation.started", "model.diverged", "qemu.exited"]
        assert reloaded.state.runstate is None
        assert reloaded.runstate is None
        assert replayed(store) == reloaded.state

    def test_continue_needs_pre_switchover(self, store: EventStore) -> None:
        """migrate-continue elsewhere is refused with QEMU's text."""
        vm, _ = machine(store)
        vm.start()
        with pytest.raises(IllegalTransition, match="Migration not in expected state: none"):
            vm.migrate_continue()


class TestReleases:
    """Release differences: 8.2 did not keep a suspended guest suspended."""

    def test_8_2_stop_ignores_a_suspended_guest(self, store: EventStore) -> None:
        """In 8.2 stop on a suspended guest is a no-op."""
        vm, _ = machine(store, qemu="8.2")
        vm.start()
        vm.guest_suspend()
        assert vm.stop() == ()
        assert vm.state.runstate == "suspended"

    def test_8_2_migration_wakes_a_suspended_guest(self, store: EventStore) -> None:
        """In 8.2 migrate wakes the guest first and it arrives running."""
        vm, _ = machine(store, qemu="8.2")
        vm.start()
        vm.guest_suspend()
        vm.set_parameters(mode="cpr-reboot")
        saved = vm.migrate(STATE_URI)
        assert tags(saved)[2] == "guest.woke-up"
        assert "vm.stopped:finish-migrate" in tags(saved)

    def test_9_0_has_no_device_status_without_pause_before_switchover(
        self, store: EventStore
    ) -> None:
        """Before 10.0 a save goes active -> completed; device only follows pre-switchover."""
        vm, _ = machine(store, qemu="9.0")
        vm.start()
        statuses = [t for t in tags(vm.migrate(STATE_URI)) if t.startswith("migration.status")]
        assert statuses == ["migration.status:active", "migration.status:completed"]

    def test_upgrade_between_quit_and_restart(self, store: EventStore) -> None:
        """A 9.0 save restores on an upgraded 10.0, and the upgrade is refused while QEMU runs."""
        vm, _ = machine(store, qemu="9.0")
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.migrate(STATE_URI)
        with pytest.raises(IllegalTransition, match="quit QEMU first"):
            vm.upgrade_qemu("10.0")
        vm.quit()
        vm.upgrade_qemu("10.0.2")
        vm.start(incoming=True)
        vm.migrate_incoming(STATE_URI)
        assert (vm.state.qemu_version, vm.state.runstate) == ("10.0", "running")


class TestReplay:
    """Replay equals live, at every version and from a snapshot."""

    def test_time_travel(self, store: EventStore) -> None:
        """The state replayed up to each version equals the live state at that point."""
        vm, _ = machine(store)
        history = [vm.state]
        for command in (vm.start, vm.guest_suspend, vm.stop, vm.cont, vm.system_wakeup):
            command()
            history.append(vm.state)
        for state in history:
            events = (r.event for r in store.read("vm", last=state.version) if state.version)
            assert replay("vm", events, qemu="10.0") == state

    def test_structlog_context(self, store: EventStore) -> None:
        """Applied and refused transitions are logged with the VM, versions and reasons."""
        vm, _ = machine(store)
        with capture_logs() as logs:
            vm.start()
            with pytest.raises(IllegalTransition):
                vm.system_wakeup()
        applied, refused = logs
        with capture_transitions() as transitions:
            vm.stop()
        assert [entry["command"] for entry in transitions] == ["stop"]
        assert applied["event"] == "transition.applied"
        assert (applied["from_state"], applied["to_state"], applied["stream_version"]) == (
            None,
            "running",
            1,
        )
        assert refused["event"] == "transition.refused"
        assert refused["reasons"] == ["wakeup-needs-suspended"]


class TestSnapshots:
    """A snapshot plus the tail gives the same state as the full log."""

    def test_snapshot_plus_tail(self, store: EventStore) -> None:
        """rebuild() from a mid-log snapshot equals a full replay, at every later version."""
        vm, ports = machine(store, memory=PMEM, devices=("vfio",))
        vm.start()
        vm.guest_suspend()
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        vm.migrate(STATE_URI)
        vm.save_snapshot()
        vm.quit()
        vm.reboot_host()
        vm.start(incoming=True)
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"x-ignore-shared": True})
        vm.migrate_incoming(STATE_URI)
        full = list(store.read("vm"))
        for last in range(1, len(full) + 1):
            expected = replay("vm", (r.event for r in full[:last]), qemu="10.0")
            assert rebuild(store, "vm", at=last, qemu="10.0") == expected
        reloaded = VirtualMachine("vm", store=store, executor=ports.executor(), qemu="10.0")
        assert reloaded.state == vm.state

    def test_foreign_snapshot_is_a_store_error(self, store: EventStore) -> None:
        """A snapshot that is not a VM state is a typed error naming what to do."""
        vm, _ = machine(store)
        vm.start()
        store.save_snapshot("vm", 1, {"hello": "world"})
        with pytest.raises(StoreError, match="replay the full log"):
            rebuild(store, "vm")


class TestPhaseDiagram:
    """The phase diagram is derived from the release's runstate table."""

    def test_moves_follow_the_table(self) -> None:
        """saved -> running exists (cont); running -> saved does not (it passes stopped)."""
        diagram = phase_diagram("10.0")
        assert diagram.startswith("%% QEMU 10.0\nstateDiagram-v2")
        assert "    saved --> running" in diagram
        assert "    running --> saved" not in diagram
        assert "    incoming --> running" in diagram
        for phase in PHASES:
            assert phase in diagram


class TestLateFailures:
    """An asynchronous failure at completion comes after the CPR stop, then RESUME."""

    def test_return_path_on_a_file_fails_after_the_stop(self, store: EventStore) -> None:
        """return-path to a file: STOP, RAM written, then failed and RESUME (live QEMU order)."""
        vm, _ = machine(store)
        vm.start()
        vm.set_parameters(mode="cpr-reboot")
        vm.set_capabilities({"return-path": True})
        events = tags(vm.migrate(STATE_URI))
        assert events.index("vm.stopped:finish-migrate") < events.index("ram.saved")
        assert events[-5:] == [
            "migration.status:device",
            "device-state.saved",
            "state-file.written",
            "migration.status:failed",
            "vm.resumed:running",
        ]
        assert vm.state.current_save is None
        failed = next(
            e
            for e in store.read("vm")
            if isinstance(e.event, ev.MigrationStatusReported) and e.event.status == "failed"
        )
        assert failed.event.error == "Unable to read from file: Bad file descriptor"  # type: ignore[attr-defined]
