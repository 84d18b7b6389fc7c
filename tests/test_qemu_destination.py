"""Destination-side legality (migrate-incoming, capabilities while incoming) against live QEMU."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
from live.launcher import VM, config_for, settle_migration, workdir
from live.qmp import QMPError

from cprfsm import Configuration, check

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_golden_version")]


def reply(vm: VM, command: str, **arguments: Any) -> str | None:
    """QEMU's error text for a QMP command, or None when it succeeds."""
    try:
        vm.qmp.execute(command, **arguments)
    except QMPError as exc:
        return exc.desc
    return None


def model(config: Configuration, command: str) -> str | None:
    """The model's error text for the same request (the command alone, no set-up walk)."""
    return check(config, command, qemu="10.0", walk=False).error


def capability(name: str) -> list[dict[str, object]]:
    """A migrate-set-capabilities argument turning ``name`` on."""
    return [{"capability": name, "state": True}]


def saved_state(directory: Path) -> str:
    """A state file saved by a running guest; its file: URI."""
    uri = f"file:{directory / 'saved.state'}"
    with VM(config_for("running"), directory, "source").start() as source:
        source.qmp.execute("migrate", uri=uri)
        assert settle_migration(source, 20.0)["status"] == "completed"
    return uri


def test_incoming_needs_defer() -> None:
    """A QEMU started without -incoming refuses migrate-incoming, as the model says."""
    with workdir() as directory, VM(config_for("running"), directory).start() as vm:
        qemu = reply(vm, "migrate-incoming", uri=f"file:{directory / 'x'}")
        assert qemu == model(Configuration(runstate="running"), "migrate-incoming")
        assert qemu is not None


def test_while_an_incoming_migration_runs() -> None:
    """multifd and postcopy-preempt are refused while incoming runs; so is a second incoming."""
    with workdir() as directory, VM(config_for("inmigrate"), directory).start() as vm:
        assert reply(vm, "migrate-incoming", uri=f"unix:{directory / 'in.sock'}") is None
        started = Configuration(runstate="inmigrate", incoming="started")
        for caps in (["multifd"], ["postcopy-ram", "postcopy-preempt"]):
            arguments = [entry for name in caps for entry in capability(name)]
            qemu = reply(vm, "migrate-set-capabilities", capabilities=arguments)
            expected = Configuration(runstate="inmigrate", incoming="started", capabilities=caps)
            assert qemu == model(expected, "migrate-set-capabilities")
            assert qemu is not None
        qemu = reply(vm, "migrate-incoming", uri=f"unix:{directory / 'again.sock'}")
        assert qemu == model(started, "migrate-incoming")


def test_after_a_completed_restore() -> None:
    """A restored QEMU accepts multifd again but still refuses a second migrate-incoming."""
    with workdir() as directory:
        uri = saved_state(directory)
        with VM(config_for("inmigrate"), directory).start() as vm:
            assert reply(vm, "migrate-incoming", uri=uri) is None
            deadline = time.monotonic() + 20.0
            while vm.migration().get("status") != "completed" and time.monotonic() < deadline:
                time.sleep(0.05)
            completed = Configuration(runstate="running", incoming="completed")
            qemu = reply(vm, "migrate-set-capabilities", capabilities=capability("multifd"))
            multifd = Configuration(
                runstate="running", incoming="completed", capabilities={"multifd"}
            )
            assert qemu is None
            assert model(multifd, "migrate-set-capabilities") is None
            qemu = reply(vm, "migrate-incoming", uri=uri)
            assert qemu == model(completed, "migrate-incoming")
            assert qemu is not None


def test_after_a_channel_that_could_not_open() -> None:
    """A failed migrate-incoming wedges QEMU in setup: another is refused, multifd is not."""
    with workdir() as directory, VM(config_for("inmigrate"), directory).start() as vm:
        missing = f"file:{directory / 'missing'}"
        assert reply(vm, "migrate-incoming", uri=missing) == (
            f"Could not open '{directory / 'missing'}': No such file or directory"
        )
        wedged = Configuration(runstate="inmigrate", incoming="wedged")
        qemu = reply(vm, "migrate-incoming", uri=missing)
        assert qemu == model(wedged, "migrate-incoming")
        assert qemu is not None
        assert reply(vm, "migrate-set-capabilities", capabilities=capability("multifd")) is None
        multifd = Configuration(runstate="inmigrate", incoming="wedged", capabilities={"multifd"})
        assert model(multifd, "migrate-set-capabilities") is None


@pytest.mark.parametrize(("cap", "scheme"), [("mapped-ram", "exec"), ("multifd", "file")])
def test_incoming_transport_rules(cap: str, scheme: str) -> None:
    """The transport checks refuse migrate-incoming with the model's text."""
    with workdir() as directory, VM(config_for("inmigrate"), directory).start() as vm:
        assert reply(vm, "migrate-set-capabilities", capabilities=capability(cap)) is None
        uri = f"exec:cat {directory / 's'}" if scheme == "exec" else f"file:{directory / 's'}"
        qemu = reply(vm, "migrate-incoming", uri=uri)
        config = Configuration(
            runstate="inmigrate", incoming="deferred", capabilities={cap}, uri=uri
        )
        assert qemu == model(config, "migrate-incoming")
        assert qemu is not None
